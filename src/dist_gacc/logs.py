"""Log lines that only the main process writes."""

from __future__ import annotations

import logging


def log_main(name: str, message: str, level: int = logging.INFO) -> None:
    """Log `message` under logger `name` on the main process, through Accelerate once it is set up (a run);
    plain logging otherwise (scripts and tests that build data or tokenizers without an Accelerator)."""
    from accelerate.logging import get_logger
    from accelerate.state import PartialState

    if PartialState._shared_state:  # Accelerate's own test before its logger may be used
        get_logger(name).log(level, message, main_process_only=True)
    else:
        logging.getLogger(name).log(level, message)
