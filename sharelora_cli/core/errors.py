"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a recipe key, a file, a flag. The message says what to do."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line reports."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
