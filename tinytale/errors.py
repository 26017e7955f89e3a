"""The one base class for mistakes a user can fix: the CLI prints them and exits 2."""


class UserError(ValueError):
    """Bad input: the message is one sentence naming what is wrong and how to fix it."""
