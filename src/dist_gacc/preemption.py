"""Stop signals: SIGTERM / SIGUSR1 (preemption, SLURM's warning) set a flag instead of killing.

The handler is installed before set-up and removed after the last output (the model card) is written, so a
signal at any moment is kept (and before: scripts/train.py keeps those that arrive while its libraries load,
handed over as `kept`): during set-up or training the run finishes the update in progress (the first
update, if the signal came during set-up: the vote rides in a window's all-reduce), checkpoints and
stops (exit 75); after the last update the outputs are completed, a warning says a signal came, and
the run ends as finished (exit 0). Optional work after training (the TF-IDF baseline, which can take a
minute) runs inside `interrupting()`: a signal before or during it abandons it, so the run ends promptly
with its model, metrics and card.
"""

from __future__ import annotations

import contextlib
import signal


class Preempted(Exception):
    """A stop signal arrived; the checkpoint at `path` (None: none was due) holds the last finished update."""

    def __init__(self, path: str | None):
        super().__init__(path)
        self.path = path


class StopRequested(BaseException):
    """A stop signal inside StopSignals.interrupting(). A BaseException, as KeyboardInterrupt is, so that no
    library's `except Exception` in the abandoned work swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.name = signal.Signals(signum).name


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, kept: list[int] | None = None):
        """`kept`: the signals that arrived before this run: they stop it as one during set-up would."""
        self.received: int | None = kept[-1] if kept else None
        self._interrupting = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if self._interrupting:
            self._interrupting = False  # once: the abandoned work's clean-up is not interrupted again
            raise StopRequested(signum)

    @contextlib.contextmanager
    def interrupting(self):
        """Work a stop signal abandons: StopRequested at once if one has arrived, else where one arrives."""
        if self.received is not None:
            raise StopRequested(self.received)
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
