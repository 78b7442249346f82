"""What both stores share: digests checked before they name anything, files hashed as
``sha256sum`` does (and re-hashed only when they change), staging into a temporary file while
hashing, and the one error for damaged bytes. The backends (`local`, `s3`) stand side by side
on it."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from portfolio.errors import IntegrityFailure

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

# (file path, digest) -> (inode, size, mtime_ns) of the file when it last hashed right: a
# process hashes a blob once, and again only if the file was replaced or touched since.
_verified: dict[tuple[str, str], tuple[int, int, int]] = {}


def check_digest(digest: str) -> str:
    """Refuse anything but 64 lowercase hex digits: digests come from the database and name
    files, so ``../x`` must never reach the file system."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise IntegrityFailure(
            f"the registry names an artifact {str(digest)[:80]!r}, which is not a sha256 digest; "
            "the database was edited by hand or is damaged (run `portfolio verify`)"
        )
    return digest


def damaged(what: str, digest: str) -> IntegrityFailure:
    """The one error for bytes that no longer match their digest."""
    return IntegrityFailure(
        f"{what} is damaged: its bytes no longer hash to {digest[:12]}; "
        "nothing was read from it; run `portfolio verify` to list every damaged artifact"
    )


def verify_file(path: Path, digest: str, what: str) -> Path:
    """Return ``path`` once its bytes hash to ``digest`` (hashed once per process while the
    file stays unchanged); raise `IntegrityFailure` naming ``what`` otherwise."""
    st = path.stat()
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), digest)
    if _verified.get(key) == stamp:
        return path
    if sha256_file(path) != digest:
        _verified.pop(key, None)
        raise damaged(what, digest)
    _verified[key] = stamp
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file's bytes, the same as ``sha256sum`` prints."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Staged:
    """A file copied into the store's ``tmp/`` and hashed, not yet in place."""

    digest: str
    size: int
    tmp: str


def stage_into(folder: Path, source: str | os.PathLike | bytes, fsync: bool) -> Staged:
    """Copy a file (or bytes) to a new temporary file in ``folder``, hashing on the way."""
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, bytes):
                hasher.update(source)
                out.write(source)
            else:
                with open(source, "rb") as inp:
                    while block := inp.read(CHUNK):
                        hasher.update(block)
                        out.write(block)
            size = out.tell()
            if fsync:
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Staged(hasher.hexdigest(), size, tmp)


def files_older_than(folder: Path, min_age: float) -> list[Path]:
    """Files in ``folder`` last written more than ``min_age`` seconds ago."""
    if not folder.is_dir():
        return []
    now = time.time()
    return sorted(p for p in folder.iterdir() if p.is_file() and now - p.stat().st_mtime >= min_age)
