"""One error hierarchy. The CLI turns every `PortfolioError` into one line on stderr.

Each message says what is wrong and, where there is one, the command that fixes it.
"""

from __future__ import annotations


class PortfolioError(Exception):
    """Base of every error `portfolio` raises on purpose."""

    exit_code = 1


class NotFound(PortfolioError, LookupError):
    """Something named by the user does not exist."""


class AdapterNotFound(NotFound):
    """No adapter, version or alias matches the reference."""


class BaseModelNotFound(NotFound):
    """No base model of that name is registered, or its files are missing."""


class DatasetNotFound(NotFound):
    """No dataset snapshot matches the reference."""


class InvalidReference(PortfolioError, ValueError):
    """A reference such as `NAME@3` is malformed."""


class InvalidDataset(PortfolioError, ValueError):
    """A dataset file is missing, empty or has a malformed line."""


class InvalidAdapter(PortfolioError, ValueError):
    """An adapter folder is not a PEFT LoRA adapter, or holds bad values."""


class IncompatibleAdapter(PortfolioError, ValueError):
    """An adapter does not fit its base model (missing module, wrong shape)."""


class AlreadyExists(PortfolioError):
    """A name is already taken."""


class InvalidState(PortfolioError):
    """The operation is not allowed in the object's current lifecycle state."""


class SchemaOutOfDate(PortfolioError):
    """The registry database is not at the schema revision this code expects."""


class DatabaseError(PortfolioError):
    """The registry database cannot be reached or refused the operation."""


class StoreError(PortfolioError):
    """The artifact store cannot be read or written."""


class IntegrityFailure(PortfolioError):
    """Stored bytes no longer match their recorded digest."""
