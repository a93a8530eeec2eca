"""Errors raised by the data pipelines and the dataset tools.

`pipelines` never imports `supmae`, so it owns its error type; the CLI treats it like
`supmae.errors.UserError`: one line on stderr, exit code 2.
"""


class DataError(Exception):
    """A dataset problem the user can fix: a missing path, a wrong field layout, a missing index."""
