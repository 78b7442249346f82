"""A content-addressed artifact folder.

Every blob lives at ``<root>/blobs/<first two hex>/<sha256>``, so identical bytes are stored
once and the name of a blob is the proof of its content. Writes go to a temporary file in
the same folder, are flushed to disk, then renamed into place: a reader never sees a
half-written blob, and a crash leaves at most a stray ``tmp/`` file.

Reads for use go through `verified_path` / `read_bytes`, which re-hash a blob the first time
a process uses it (and again whenever the file changes on disk), so a flipped bit is refused
with the `portfolio verify` advice instead of being trained on, merged or served.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from portfolio.errors import NotFound, StoreError
from portfolio.store.base import ArtifactStore
from portfolio.store.digests import DIGEST_RE, Staged, check_digest, damaged, files_older_than, sha256_file, stage_into, verify_file

class LocalStore(ArtifactStore):
    """Blobs on a local (or mounted) file system, addressed by sha256."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _ensure(self) -> None:
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create artifact store at {self.root}: {exc.strerror}; "
                "pass a writable folder with --store or PORTFOLIO_STORE"
            ) from exc

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        check_digest(digest)
        return self.root / "blobs" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        """Whether the blob is present."""
        return self.path(digest).is_file()

    def stage(self, source: str | os.PathLike | bytes) -> "Staged":
        """Copy a file (or bytes) to a temporary file in the store, hashing on the way; the
        blob appears under its digest only at `commit`. Writers stage first, lock the
        digest's record, then commit, so a blob is never deleted under a writer's feet."""
        self._ensure()
        return stage_into(self.root / "tmp", source, fsync=True)

    def commit(self, staged: "Staged") -> bool:
        """Put a staged file in place (or drop it and freshen the blob already there);
        return whether the blob was newly written."""
        dest = self.path(staged.digest)
        if dest.exists():
            Path(staged.tmp).unlink(missing_ok=True)
            self._touch(dest)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.tmp, 0o444)  # blobs are immutable
        os.replace(staged.tmp, dest)
        return True

    def discard(self, staged: "Staged") -> None:
        """Drop a staged file that will not be committed."""
        Path(staged.tmp).unlink(missing_ok=True)

    @staticmethod
    def _touch(path: Path) -> None:
        # A reused blob is about to be recorded: freshen its mtime so `gc`, which only
        # removes unrecorded blobs older than its grace period, leaves it alone meanwhile.
        try:
            os.utime(path)
        except OSError:
            pass

    def age_seconds(self, digest: str) -> float:
        """Seconds since the blob was written or last reused (inf if absent)."""
        import time

        try:
            return time.time() - self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def stale_temp_files(self, min_age: float) -> list[Path]:
        """Leftovers of interrupted writes in ``tmp/`` older than ``min_age`` seconds."""
        return files_older_than(self.root / "tmp", min_age)

    def _missing(self, digest: str) -> NotFound:
        return NotFound(
            f"artifact {digest[:12]} is missing from the store {self.root}; "
            "run `portfolio verify` to list every missing or damaged artifact"
        )

    def verified_path(self, digest: str, what: str | None = None) -> Path:
        """The blob's file, after checking its bytes still hash to ``digest`` (once per
        process while the file is unchanged). ``what`` names it in the error."""
        path = self.path(digest)
        try:
            return verify_file(path, digest, what or f"artifact {digest[:12]}")
        except FileNotFoundError:
            raise self._missing(digest) from None

    def read_bytes(self, digest: str, what: str | None = None) -> bytes:
        """The blob's bytes, checked against their digest."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise self._missing(digest) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise damaged(what or f"artifact {digest[:12]}", digest)
        return data

    def size(self, digest: str) -> int:
        """The blob's size in bytes (0 if absent)."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def work_dir(self, run_id: int) -> Path:
        """``<root>/work/runs/<id>``: inside the store, so every process that sees the store
        sees the checkpoints (a shared folder or NFS mount is enough for several hosts)."""
        folder = self.root / "work" / "runs" / str(int(run_id))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def work_runs(self) -> list[int]:
        """Runs with a work folder."""
        runs = self.root / "work" / "runs"
        return sorted(int(p.name) for p in runs.iterdir() if p.is_dir() and p.name.isdigit()) if runs.is_dir() else []

    def work_bytes(self, run_id: int) -> int:
        """The size of a run's work folder."""
        folder = self.root / "work" / "runs" / str(int(run_id))
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0

    def remove_work(self, run_id: int) -> int:
        """Delete a run's work folder; return the bytes freed."""
        size = self.work_bytes(run_id)
        shutil.rmtree(self.root / "work" / "runs" / str(int(run_id)), ignore_errors=True)
        return size

    def delete(self, digest: str) -> bool:
        """Remove a blob; return whether it was there."""
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def digests(self) -> Iterator[str]:
        """Every digest present in the store."""
        blobs = self.root / "blobs"
        if not blobs.is_dir():
            return
        for sub in sorted(blobs.iterdir()):
            for blob in sorted(sub.iterdir()):
                if DIGEST_RE.match(blob.name) and blob.name[:2] == sub.name:
                    yield blob.name

    def check(self, digest: str) -> str:
        """Re-hash a blob: ``"ok"``, ``"missing"``, ``"corrupt"`` or ``"invalid"`` (the
        record names no sha256 digest)."""
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            return "invalid"
        path = self.path(digest)
        if not path.is_file():
            return "missing"
        return "ok" if sha256_file(path) == digest else "corrupt"
