"""Errors that are the user's to fix: the CLI prints them without a traceback and exits non-zero."""


class UserError(Exception):
    """Bad input or configuration: the message says what was wrong and what to do."""
