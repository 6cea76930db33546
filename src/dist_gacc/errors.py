"""Errors, their exit codes, and telling the user's input from the machine's environment.

The CLI prints these without a traceback and exits with the documented code (README, "exit codes").
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input: the message names the key, file, column, row or value at fault."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""


class EnvironmentFailure(Exception):
    """The machine, not the input: disk full, permission denied, the Hugging Face Hub unreachable."""


# Exit codes of scripts/train.py (documented in README).
EXIT_BAD_INPUT = 2      # config, data or checkpoint rejected before training
EXIT_TRAINING_FAILED = 3
EXIT_ENVIRONMENT = 74   # disk full, permission denied, Hub unreachable (EX_IOERR): fix the machine, rerun
EXIT_PREEMPTED = 75     # stop signal: checkpoint saved; rerun with resume=auto (EX_TEMPFAIL)

# OS errors that say something about the machine rather than about what the user asked for.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
}
# Raised (somewhere in the chain) when the Hub cannot be reached: offline mode, no network, timeouts.
HUB_UNREACHABLE = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout",
                   "ReadTimeout", "ConnectError", "Timeout", "MaxRetryError", "NameResolutionError"}


def environment_cause(err: BaseException) -> str | None:
    """What in the environment caused `err` (its chain of causes included), or None if nothing did."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, EnvironmentFailure):
            return str(err)
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            where = f": {err.filename}" if err.filename else ""
            return f"{ENVIRONMENT_ERRNOS[err.errno]}{where}"
        if type(err).__name__ in HUB_UNREACHABLE:
            return ("the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                    f"set) and nothing is cached: {type(err).__name__}: {str(err)[:200]}")
        err = err.__cause__ or err.__context__
    return None
