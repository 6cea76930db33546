"""Errors in what the user gave us (config, data, checkpoint). The CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input: the message names the key, file, column, row or value at fault."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""


# Exit codes of scripts/train.py (documented in README).
EXIT_BAD_INPUT = 2      # config, data or checkpoint rejected before training
EXIT_TRAINING_FAILED = 3
EXIT_PREEMPTED = 75     # stop signal: checkpoint saved; rerun with resume=auto (EX_TEMPFAIL)
