"""Choosing a store from its URL: one table of backends, by URL scheme (a folder has none)."""

from __future__ import annotations

import os
from collections.abc import Callable

from portfolio.errors import StoreError
from portfolio.store.base import ArtifactStore
from portfolio.store.local import LocalStore
from portfolio.store.s3 import S3Store

BACKENDS: dict[str, Callable[[str], ArtifactStore]] = {
    "": LocalStore,  # a folder
    "s3": S3Store.from_url,  # boto3 is imported only when a bucket is opened (the optional `s3` extra)
}


def open_store(spec: str | os.PathLike) -> ArtifactStore:
    """The store named by ``spec``: ``s3://bucket/prefix`` or a folder."""
    text = str(spec)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme not in BACKENDS:
        raise StoreError(f"unknown store {text!r}: use a folder or s3://bucket/prefix")
    return BACKENDS[scheme](text)
