"""Content-addressed artifact storage: a local folder or an S3-compatible bucket, behind one
interface (`store.base.ArtifactStore`), chosen by URL (`store.backends.open_store`)."""

from portfolio.store.backends import open_store
from portfolio.store.base import ArtifactStore
from portfolio.store.digests import sha256_file
from portfolio.store.local import LocalStore

__all__ = ["ArtifactStore", "LocalStore", "open_store", "sha256_file"]
