"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (arguments, files, configuration), not a bug."""
