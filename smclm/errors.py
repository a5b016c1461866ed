"""Errors that mean "the user asked for something that cannot work": the CLI prints their message
as one line and exits with status 2. Their messages name the problem and the fix."""


class UserError(Exception):
    """A bad configuration or input, reported as one line."""


class ConfigError(UserError, ValueError):
    pass
