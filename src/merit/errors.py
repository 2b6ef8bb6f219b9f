"""Errors a user can cause. The CLI prints them in one line and exits with code 2 (no traceback)."""


class MeritError(Exception):
    """A problem with the user's input: config, data file or checkpoint. The message says where and what to do."""


class ConfigError(MeritError):
    """The run config is invalid."""


class DataError(MeritError):
    """A data file is missing or malformed."""
