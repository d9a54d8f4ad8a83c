"""Errors the CLI reports as one clear line (what and where) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a URI, a name. The message says what and where."""
