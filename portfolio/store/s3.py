"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, GCS's S3 interface) through boto3.

Layout and guarantees are the local store's (`store.local`):

- ``<prefix>/blobs/<first two hex>/<sha256>``: a blob's key is its digest, so identical bytes are
  stored once. A commit is a **conditional put** (``If-None-Match: *``), so two hosts writing the
  same blob cannot overwrite each other; servers without conditional writes get head-then-put
  (safe too: the bytes under a digest key are the same whoever writes them).
- Every upload carries the blob's **sha256 checksum** (``x-amz-checksum-sha256``; per part for a
  multipart upload), which the server checks against what it received, so a transfer corrupted
  on the way is rejected. Before sending, the bytes read back from the staging file are hashed
  again and must equal the digest, so a staging file damaged on local disk is never uploaded.
- Blobs above ``multipart_threshold`` go as **multipart uploads** in ``part_size`` parts; one cut
  off (a killed process, the server gone) is aborted on the spot when possible, and otherwise
  listed by `stale_uploads` for `gc` to abort.
- Reads go through a **bounded read-through cache** on local disk (``PORTFOLIO_CACHE``,
  ``PORTFOLIO_CACHE_GB``): a merge, an export or a training run on a worker downloads each blob
  once, checked against its digest; least recently used blobs are evicted over the budget. A
  blob this host uploaded is put in its cache as it is committed.
- `check` (behind `portfolio verify`) re-hashes the **stored** bytes, streamed, never the cache.
- Training work folders live in the cache; checkpoints are copied to
  ``<prefix>/work/runs/<id>/`` after each save, so another host resumes a killed run.

Endpoint, region and credentials come the standard boto3 way (environment, ``~/.aws``), plus
``PORTFOLIO_S3_ENDPOINT_URL`` for S3-compatible servers. Every failure becomes one line naming
the store and the fix (`_errors`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from portfolio.errors import IntegrityFailure, NotFound, StoreError
from portfolio.store.base import ArtifactStore
from portfolio.store.cache import cache_limit_bytes, cache_root
from portfolio.store.digests import CHUNK, DIGEST_RE, Staged, check_digest, damaged, files_older_than, sha256_file, stage_into, verify_file

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
CHECKSUM_CODES = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch", "InvalidChecksum"}


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class S3Store(ArtifactStore):
    """Blobs in ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, cache: str | os.PathLike | None = None,
                 multipart_threshold: int | None = None, part_size: int | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("an s3:// store needs boto3: pip install 'portfolio[s3]' (or pip install boto3)") from None

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint = endpoint_url or os.environ.get("PORTFOLIO_S3_ENDPOINT_URL") or None
        # checksums only where an operation needs them, then always our own sha256: the newer
        # botocore default (CRC32 trailers on every request) is not understood by every
        # S3-compatible server
        config = Config(retries={"max_attempts": int(os.environ.get("PORTFOLIO_S3_ATTEMPTS", "3")), "mode": "standard"},
                        connect_timeout=5, read_timeout=60, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
        self.multipart_threshold = multipart_threshold or int(os.environ.get("PORTFOLIO_S3_MULTIPART_BYTES", MULTIPART_THRESHOLD))
        self.part_size = max(5 * 1024 * 1024, part_size or int(os.environ.get("PORTFOLIO_S3_PART_BYTES", PART_SIZE)))
        tag = hashlib.sha256(f"{self.endpoint or 'aws'}|{self.url}".encode()).hexdigest()[:16]
        self.cache = Path(cache) if cache else cache_root() / "s3" / tag
        self._checked_bucket = False
        self._conditional = True  # False once the server says it has no conditional writes

    @classmethod
    def from_url(cls, url: str) -> "S3Store":
        """``s3://bucket[/prefix]``."""
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"store {url!r} names no bucket; use s3://BUCKET/PREFIX")
        return cls(bucket, prefix)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    # -- errors -----------------------------------------------------------------------------
    @contextmanager
    def _errors(self, doing: str, digest: str | None = None) -> Iterator[None]:
        """Turn every botocore failure into one line that names the store and the fix."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        where = f"{self.url}" + (f" at {self.endpoint}" if self.endpoint else "")
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and doing == "open the bucket"):
                raise StoreError(f"bucket {self.bucket!r} does not exist ({where}); create it or fix --store / PORTFOLIO_STORE") from None
            if code in CREDENTIAL_CODES or status == 403:
                raise StoreError(f"the S3 server refused the credentials for {where} ({code or status}); set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key that may read and write the bucket") from None
            if code in CHECKSUM_CODES:
                raise IntegrityFailure(f"the S3 server rejected blob {(digest or '?')[:12]} while trying to {doing}: the bytes it received "
                                       f"do not match their sha256 ({code}); nothing was recorded; retry the command") from None
            message = str(exc.response.get("Error", {}).get("Message", "")) or str(exc)
            raise StoreError(f"S3 store {where}: could not {doing}: {code or status}: {message.splitlines()[0]}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach the S3 store {where} to {doing} ({type(exc).__name__}); check that the server is up "
                             "and PORTFOLIO_S3_ENDPOINT_URL") from None

    def _ensure_bucket(self) -> None:
        if not self._checked_bucket:
            with self._errors("open the bucket"):
                self.client.head_bucket(Bucket=self.bucket)
            self._checked_bucket = True

    # -- keys and local folders -----------------------------------------------------------------
    def _key(self, digest: str) -> str:
        check_digest(digest)
        return "/".join(p for p in (self.prefix, "blobs", digest[:2], digest) if p)

    def _work_key(self, run_id: int, name: str = "") -> str:
        return "/".join(p for p in (self.prefix, "work", "runs", str(int(run_id)), name) if p)

    def _cached(self, digest: str) -> Path:
        return self.cache / "blobs" / digest[:2] / digest

    def _tmp(self) -> Path:
        folder = self.cache / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        with self._errors("look up an object"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    # -- writing ------------------------------------------------------------------------------
    def stage(self, source: str | os.PathLike | bytes) -> Staged:
        """Copy to the cache's ``tmp/``, hashing on the way (no fsync: the bucket, not this
        disk, is where the blob must survive)."""
        return stage_into(self._tmp(), source, fsync=False)

    def commit(self, staged: Staged) -> bool:
        """Upload unless present (see the module docstring); keep the bytes in the cache."""
        key = self._key(staged.digest)
        self._ensure_bucket()
        try:
            head = self._head(key)
            if head is not None:
                self._freshen(key, head)
                return False
            if staged.size > self.multipart_threshold:
                written = self._put_multipart(key, staged)
            else:
                written = self._put_single(key, staged)
            if written:
                self._keep(staged.tmp, staged.digest)
            return written
        finally:
            Path(staged.tmp).unlink(missing_ok=True)

    def _put_single(self, key: str, staged: Staged) -> bool:
        from botocore.exceptions import ClientError

        data = Path(staged.tmp).read_bytes()
        if hashlib.sha256(data).hexdigest() != staged.digest:
            raise damaged(f"the staged copy of blob {staged.digest[:12]} (in {self.cache / 'tmp'})", staged.digest)
        args = {"Bucket": self.bucket, "Key": key, "Body": data, "ChecksumSHA256": _b64(staged.digest), "Metadata": {"sha256": staged.digest}}
        with self._errors("upload a blob", staged.digest):
            try:
                self.client.put_object(**args, **({"IfNoneMatch": "*"} if self._conditional else {}))
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False  # another writer put the same bytes first
                if code in ("NotImplemented", "501") and self._conditional:
                    self._conditional = False  # no conditional writes here: head-then-put
                    self.client.put_object(**args)
                else:
                    raise
        return True

    def _put_multipart(self, key: str, staged: Staged) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("start a multipart upload", staged.digest):
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256",
                                                         Metadata={"sha256": staged.digest})["UploadId"]
        parts, whole = [], hashlib.sha256()
        try:
            with open(staged.tmp, "rb") as fh:
                number = 1
                while block := fh.read(self.part_size):
                    whole.update(block)
                    with self._errors("upload a part", staged.digest):
                        r = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=block,
                                                    ChecksumSHA256=base64.b64encode(hashlib.sha256(block).digest()).decode())
                    parts.append({"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": r.get("ChecksumSHA256")
                                  or base64.b64encode(hashlib.sha256(block).digest()).decode()})
                    number += 1
            if whole.hexdigest() != staged.digest:
                raise damaged(f"the staged copy of blob {staged.digest[:12]} (in {self.cache / 'tmp'})", staged.digest)
            with self._errors("finish a multipart upload", staged.digest):
                try:
                    self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts},
                                                          **({"IfNoneMatch": "*"} if self._conditional else {}))
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                        return False
                    raise
            return True
        except BaseException:
            self._abort_quietly(key, upload)
            raise

    def _abort_quietly(self, key: str, upload: str) -> None:
        # best effort: with the server gone this fails too, and `gc` finds the upload later
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except Exception:  # noqa: BLE001 - any failure here leaves work for gc, never a wrong record
            pass

    def _freshen(self, key: str, head: dict[str, Any]) -> None:
        # A reused blob is about to be recorded: renew its LastModified (a copy onto itself),
        # so `gc`, which removes only unrecorded blobs older than its grace period, leaves it.
        if time.time() - head["LastModified"].timestamp() < 60:
            return
        with self._errors("freshen a blob"):
            self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                    Metadata={**head.get("Metadata", {}), "touched": str(int(time.time()))}, MetadataDirective="REPLACE")

    def discard(self, staged: Staged) -> None:
        """Drop a staged blob."""
        Path(staged.tmp).unlink(missing_ok=True)

    # -- the read-through cache -----------------------------------------------------------------
    def _keep(self, path: str | Path, digest: str) -> Path:
        dest = self._cached(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        self._evict(keep=dest)
        return dest

    def _evict(self, keep: Path) -> None:
        """Remove least recently used cached blobs while the cache is over its budget."""
        folder = self.cache / "blobs"
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in folder.glob("*/*") if p.is_file()]
        total, budget = sum(s for _, s, _ in files), cache_limit_bytes()
        for _, size, path in sorted(files):
            if total <= budget:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    def verified_path(self, digest: str, what: str | None = None) -> Path:
        """The cached copy, downloaded (streamed, hashed) on first use on this host."""
        what = what or f"artifact {digest[:12]}"
        cached = self._cached(check_digest(digest))
        if cached.is_file():
            try:
                verify_file(cached, digest, what)
                os.utime(cached)  # most recently used
                return cached
            except IntegrityFailure:
                cached.unlink(missing_ok=True)  # a damaged cache is only a cache: fetch again
        fd, tmp = tempfile.mkstemp(dir=self._tmp())
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, self._errors("download a blob", digest):
                from botocore.exceptions import ClientError

                try:
                    body = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        raise NotFound(f"{what} ({digest[:12]}) is missing from the store {self.url}; "
                                       "run `portfolio verify` to list every missing or damaged artifact") from None
                    raise
                for block in body.iter_chunks(CHUNK):
                    hasher.update(block)
                    out.write(block)
            if hasher.hexdigest() != digest:
                raise damaged(f"{what} in {self.url}", digest)
            return self._keep(tmp, digest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- inventory --------------------------------------------------------------------------------
    def exists(self, digest: str) -> bool:
        """Whether the bucket holds the blob."""
        return self._head(self._key(digest)) is not None

    def size(self, digest: str) -> int:
        """The stored blob's size (0 if absent)."""
        head = self._head(self._key(digest))
        return int(head["ContentLength"]) if head else 0

    def age_seconds(self, digest: str) -> float:
        """Seconds since the blob was written or freshened (inf if absent)."""
        head = self._head(self._key(digest))
        return time.time() - head["LastModified"].timestamp() if head else float("inf")

    def delete(self, digest: str) -> bool:
        """Remove the blob from the bucket and this host's cache."""
        key = self._key(digest)
        present = self._head(key) is not None
        with self._errors("delete a blob", digest):
            self.client.delete_object(Bucket=self.bucket, Key=key)
        self._cached(digest).unlink(missing_ok=True)
        return present

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        with self._errors("list the bucket"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def digests(self) -> Iterator[str]:
        """Every blob in the bucket under this prefix."""
        base = "/".join(p for p in (self.prefix, "blobs") if p) + "/"
        for obj in self._list(base):
            sub, _, name = obj["Key"][len(base):].partition("/")
            if DIGEST_RE.match(name) and name[:2] == sub:
                yield name

    def check(self, digest: str) -> str:
        """Re-hash the stored bytes, streamed from the bucket."""
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            return "invalid"
        from botocore.exceptions import ClientError

        hasher = hashlib.sha256()
        with self._errors("read a blob", digest):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return "missing"
                raise
            for block in body.iter_chunks(CHUNK):
                hasher.update(block)
        return "ok" if hasher.hexdigest() == digest else "corrupt"

    def stale_temp_files(self, min_age: float) -> list[Path]:
        """Staging leftovers on this host older than ``min_age`` seconds."""
        return files_older_than(self.cache / "tmp", min_age)

    def stale_uploads(self, min_age: float) -> list[dict[str, Any]]:
        """Multipart uploads under this prefix begun more than ``min_age`` seconds ago and never finished."""
        out = []
        with self._errors("list unfinished uploads"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if time.time() - up["Initiated"].timestamp() >= min_age:
                        out.append({"key": up["Key"], "upload_id": up["UploadId"]})
        return out

    def abort_upload(self, item: dict[str, Any]) -> None:
        """Abort an unfinished multipart upload (its parts are deleted by the server)."""
        with self._errors("abort an unfinished upload"):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=item["key"], UploadId=item["upload_id"])

    # -- work folders ----------------------------------------------------------------------------
    def work_dir(self, run_id: int) -> Path:
        """The run's work folder in this host's cache."""
        folder = self.cache / "work" / "runs" / str(int(run_id))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def push_work(self, run_id: int, path: Path) -> None:
        """Upload a work file (a checkpoint), replacing the store's copy, with its sha256
        (hashed, then streamed from disk: a checkpoint can be several times the adapter)."""
        path = Path(path)
        digest = sha256_file(path)
        self._ensure_bucket()
        with open(path, "rb") as body, self._errors("upload a checkpoint", digest):
            self.client.put_object(Bucket=self.bucket, Key=self._work_key(run_id, path.name), Body=body,
                                   ChecksumSHA256=_b64(digest), Metadata={"sha256": digest, "mtime": str(path.stat().st_mtime)})

    def pull_work(self, run_id: int, name: str) -> bool:
        """Fetch the store's copy of a work file when this host has none or an older one
        (streamed to disk and checked against the sha256 it was uploaded with)."""
        local = self.work_dir(run_id) / name
        head = self._head(self._work_key(run_id, name))
        if head is None:
            return False
        remote_mtime = float(head.get("Metadata", {}).get("mtime", "0"))
        if local.is_file() and local.stat().st_mtime >= remote_mtime:
            return False
        fd, tmp = tempfile.mkstemp(dir=local.parent)
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, self._errors("download a checkpoint"):
                for block in self.client.get_object(Bucket=self.bucket, Key=self._work_key(run_id, name))["Body"].iter_chunks(CHUNK):
                    hasher.update(block)
                    out.write(block)
            expected = head.get("Metadata", {}).get("sha256")
            if expected and hasher.hexdigest() != expected:
                raise damaged(f"the stored checkpoint of run {run_id}", expected)
            os.utime(tmp, (remote_mtime, remote_mtime))
            os.replace(tmp, local)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True

    def work_runs(self) -> list[int]:
        """Runs with a work folder in the bucket or on this host."""
        base = self._work_key(0)[: -len("0")]
        ids = {int(o["Key"][len(base):].split("/", 1)[0]) for o in self._list(base) if o["Key"][len(base):].split("/", 1)[0].isdigit()}
        local = self.cache / "work" / "runs"
        if local.is_dir():
            ids |= {int(p.name) for p in local.iterdir() if p.is_dir() and p.name.isdigit()}
        return sorted(ids)

    def work_bytes(self, run_id: int) -> int:
        """The size of a run's work files in the bucket and on this host."""
        folder = self.cache / "work" / "runs" / str(int(run_id))
        local = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
        return local + sum(int(o.get("Size", 0)) for o in self._list(self._work_key(run_id) + "/"))

    def remove_work(self, run_id: int) -> int:
        """Delete a run's work files from the bucket and this host."""
        freed = 0
        for obj in list(self._list(self._work_key(run_id) + "/")):
            with self._errors("delete a checkpoint"):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
            freed += int(obj.get("Size", 0))
        folder = self.cache / "work" / "runs" / str(int(run_id))
        if folder.is_dir():
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        return freed
