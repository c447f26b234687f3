"""Errors whose message is meant for the user: the CLI prints them without a traceback."""


class SarExpError(Exception):
    """Base class: bad input that the user can fix."""


class DataError(SarExpError):
    """A dataset file, column or value is missing or malformed."""


class ConfigError(SarExpError):
    """A config key has a value that cannot work."""
