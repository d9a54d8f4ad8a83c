"""Errors the CLI reports as one clear line (what and where) instead of a traceback."""

import os

from hint_model import CheckpointError, HintConfigError
from hint_platform.redact import env_secrets, redact_text


class UserError(Exception):
    """Bad input from the user: a config, a path, a URI, a name. The message says what and where,
    never a secret: a password in a URI it names, or the value of a secret variable of this
    process, shows as ***."""

    def __init__(self, message: str = "", *args):
        super().__init__(redact_text(str(message), env_secrets(os.environ)), *args)


class TrainingError(UserError):
    """A run that cannot go on for a reason the user can fix (memory, data size)."""


class DataError(UserError):
    """A training record that cannot be used: the message names the file and line."""


# What the CLI reports as one line: ours, and the model's own errors about a config or a
# checkpoint directory (ValueErrors in hint_model, which knows nothing of the platform).
USER_ERRORS = (UserError, HintConfigError, CheckpointError)
