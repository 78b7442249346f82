"""A content-addressed artifact folder.

Every blob lives at ``<root>/blobs/<first two hex>/<sha256>``, so identical bytes are stored
once and the name of a blob is the proof of its content. Writes go to a temporary file in
the same folder, are flushed to disk, then renamed into place: a reader never sees a
half-written blob, and a crash leaves at most a stray ``tmp/`` file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from portfolio.errors import NotFound, StoreError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes, the same as ``sha256sum`` prints."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class LocalStore:
    """Blobs on a local (or mounted) file system, addressed by sha256."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

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
        return self.root / "blobs" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        """Whether the blob is present."""
        return self.path(digest).is_file()

    def put_file(self, src: str | os.PathLike) -> tuple[str, bool]:
        """Copy a file into the store; return ``(digest, newly_written)``."""
        self._ensure()
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while block := inp.read(CHUNK):
                    hasher.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            return self._commit(tmp, hasher.hexdigest())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store bytes; return ``(digest, newly_written)``."""
        self._ensure()
        digest = hashlib.sha256(data).hexdigest()
        if self.exists(digest):
            self._touch(self.path(digest))
            return digest, False
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            return self._commit(tmp, digest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _commit(self, tmp: str, digest: str) -> tuple[str, bool]:
        dest = self.path(digest)
        if dest.exists():
            Path(tmp).unlink(missing_ok=True)
            self._touch(dest)
            return digest, False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)  # blobs are immutable
        os.replace(tmp, dest)
        return digest, True

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
        import time

        folder = self.root / "tmp"
        if not folder.is_dir():
            return []
        now = time.time()
        return sorted(p for p in folder.iterdir() if p.is_file() and now - p.stat().st_mtime >= min_age)

    def read_bytes(self, digest: str) -> bytes:
        """The blob's bytes."""
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"artifact {digest[:12]} is missing from the store {self.root}; "
                "run `portfolio verify` to list every missing or damaged artifact"
            ) from None

    def copy_to(self, digest: str, dest: str | os.PathLike) -> None:
        """Write the blob to ``dest`` (a fresh, writable copy)."""
        src = self.path(digest)
        if not src.is_file():
            self.read_bytes(digest)  # raises the helpful NotFound
        shutil.copyfile(src, dest)

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
                yield blob.name

    def check(self, digest: str) -> str:
        """Re-hash a blob: ``"ok"``, ``"missing"`` or ``"corrupt"``."""
        path = self.path(digest)
        if not path.is_file():
            return "missing"
        return "ok" if sha256_file(path) == digest else "corrupt"
