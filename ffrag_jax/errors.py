"""User-facing errors.

Anything a user can cause with bad input (a wrong path, a bad config key, an impossible
LoRA rank) raises :class:`UserError` with a one-line message that names the culprit. The
launcher prints these as ``error: <message>`` and exits with status 2 instead of showing a
traceback; programming errors still raise normally.
"""


class UserError(ValueError):
    """Bad input from the user: a one-line message naming the culprit."""
