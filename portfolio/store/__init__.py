"""Content-addressed artifact storage: a local folder or an S3-compatible bucket, behind one
interface (`store.base.ArtifactStore`)."""

from portfolio.store.base import ArtifactStore, open_store
from portfolio.store.local import LocalStore, sha256_file

__all__ = ["ArtifactStore", "LocalStore", "open_store", "sha256_file"]
