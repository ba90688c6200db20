"""The one exception type that the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong option, key, value, path or file. The message says what to do."""
