"""Errors a user can act on: raised with one line that names the file, record or key."""


class ECGDistillError(Exception):
    """Base class; the CLI prints these as one line (``error: ...``) and exits with status 2."""


class RecipeError(ECGDistillError, ValueError):
    """A recipe key is unknown, of the wrong type or out of range."""


class DataError(ECGDistillError, ValueError):
    """A data file or record is missing, truncated, corrupt or unusable."""
