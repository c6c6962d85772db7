"""Errors a user can cause. Command-line tools print their message and exit with status 2."""


class UserError(Exception):
    """A problem with what the user asked for (preset, option, data, checkpoint), with its fix."""


class DataError(UserError):
    """A dataset that cannot be found, read or understood."""
