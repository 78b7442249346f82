"""The one interface both artifact stores implement: a local folder (`store.local`) and an
S3-compatible bucket (`store.s3`).

Blobs are addressed by their sha256 and immutable. A writer **stages** bytes (hashing them on
the way, on local disk), locks the digest's ``artifacts`` row, then **commits** (puts the blob
in place if absent); whoever deletes a blob holds that row too (`Registry._write`,
`registry.lifecycle`). Readers ask for a **verified local path**: the bytes, checked against
their digest, on this machine's disk (the local store's own file; for S3 a read-through cache).

Training runs keep their checkpoints in a **work folder** on local disk; `push_work` copies a
checkpoint to the store and `pull_work` fetches it back, so that a run killed on one host can
be resumed on another (no-ops for the local store, whose work folder is inside the store).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ArtifactStore(ABC):
    """Content-addressed, immutable blobs plus per-run work folders."""

    url: str  # how a person names this store (a folder, or s3://bucket/prefix)

    # -- writing: stage, then commit under the digest's row lock --------------------------------
    @abstractmethod
    def stage(self, source: str | os.PathLike | bytes) -> Any:
        """Copy a file (or bytes) to local temporary space, hashing it; returns a `Staged`."""

    @abstractmethod
    def commit(self, staged: Any) -> bool:
        """Put a staged blob in place unless present (then freshen it); return whether it
        was newly written. The upload is checked against the staged digest."""

    @abstractmethod
    def discard(self, staged: Any) -> None:
        """Drop a staged blob that will not be committed."""

    def put_file(self, src: str | os.PathLike) -> tuple[str, bool]:
        """Store a file; return ``(digest, newly_written)``."""
        staged = self.stage(src)
        return staged.digest, self.commit(staged)

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store bytes; return ``(digest, newly_written)``."""
        staged = self.stage(data)
        return staged.digest, self.commit(staged)

    # -- reading ----------------------------------------------------------------------------
    @abstractmethod
    def verified_path(self, digest: str, what: str | None = None) -> Path:
        """A local file holding the blob, checked against its digest."""

    def read_bytes(self, digest: str, what: str | None = None) -> bytes:
        """The blob's bytes, checked against their digest."""
        return self.verified_path(digest, what).read_bytes()

    def copy_to(self, digest: str, dest: str | os.PathLike) -> None:
        """Write the blob to ``dest`` (a fresh, writable copy), checked first."""
        import shutil

        shutil.copyfile(self.verified_path(digest), dest)

    # -- inventory, integrity, deletion -------------------------------------------------------
    @abstractmethod
    def exists(self, digest: str) -> bool:
        """Whether the blob is present."""

    @abstractmethod
    def size(self, digest: str) -> int:
        """The blob's size in bytes (0 if absent)."""

    @abstractmethod
    def age_seconds(self, digest: str) -> float:
        """Seconds since the blob was written or last reused (inf if absent)."""

    @abstractmethod
    def delete(self, digest: str) -> bool:
        """Remove a blob; return whether it was there."""

    @abstractmethod
    def digests(self) -> Iterator[str]:
        """Every digest present."""

    @abstractmethod
    def check(self, digest: str) -> str:
        """Re-hash the stored bytes (streaming): ``ok``, ``missing``, ``corrupt`` or ``invalid``."""

    @abstractmethod
    def stale_temp_files(self, min_age: float) -> list[Path]:
        """Local leftovers of interrupted writes older than ``min_age`` seconds."""

    def stale_uploads(self, min_age: float) -> list[dict[str, Any]]:
        """Uploads begun and never finished (an S3 multipart upload cut off), older than ``min_age``."""
        return []

    def abort_upload(self, item: dict[str, Any]) -> None:
        """Abandon one of `stale_uploads`."""

    # -- training work folders ----------------------------------------------------------------
    #: The one file of a run's work folder that outlives the run's process (a resumable
    #: checkpoint); named here because both training and `copy-store` need it.
    CHECKPOINT_FILE = "checkpoint.safetensors"

    @abstractmethod
    def work_dir(self, run_id: int) -> Path:
        """The run's local work folder (created)."""

    def push_work(self, run_id: int, path: Path) -> None:
        """Copy a file of the run's work folder to the store (so another host can resume)."""

    def pull_work(self, run_id: int, name: str) -> bool:
        """Fetch the store's copy of a work file into the local work folder when the local
        one is missing or older; return whether one was fetched."""
        return False

    @abstractmethod
    def work_runs(self) -> list[int]:
        """Runs that have a work folder (locally or in the store)."""

    @abstractmethod
    def work_bytes(self, run_id: int) -> int:
        """The size of a run's work folder (locally and in the store)."""

    @abstractmethod
    def remove_work(self, run_id: int) -> int:
        """Delete a run's work folder everywhere; return the bytes freed."""
