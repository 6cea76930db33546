"""Errors in what the user gave us (config, data, checkpoint). The CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input: the message names the key, file, column, row or value at fault."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
