"""Content-addressed artifact storage."""

from portfolio.store.local import LocalStore, sha256_file

__all__ = ["LocalStore", "sha256_file"]
