"""`Registry`: the Python API over the database and the artifact store.

Every public method is one unit of work. Writes put blobs in the store first, then record
them in one transaction; if the transaction fails, blobs it newly wrote are removed again,
so a failed command leaves neither half a row nor an orphan artifact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from portfolio import adapter_files
from portfolio.data import formats
from portfolio.errors import InvalidState, PortfolioError
from portfolio.registry import changes, db, lifecycle, quality, queries, taint, transfer, versions
from portfolio.registry import entities as E
from portfolio.registry.bases import Bases
from portfolio.registry.browse import Browse
from portfolio.registry.datasets import Datasets
from portfolio.registry.deployments import Deployments
from portfolio.registry.governance import DataRevoked, Governance
from portfolio.registry.lineage import lineage as _lineage
from portfolio.registry.quality import Evaluations, Gates
from portfolio.registry.retention import Retention
from portfolio.registry.routes import Routes
from portfolio.registry.runs import Runs
from portfolio.registry.suites import Suites
from portfolio.registry.webhooks import Events, Webhooks
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasEventRow,
    AliasRow,
    ArtifactRow,
    BaseModelRow,
    VersionTagRow,
    utcnow,
)
from portfolio.registry.queries import model_label
from portfolio.registry.refs import ALIAS_MAX, VERSION_RE, check_length, check_name, parse_ref
from portfolio.registry.specs import DataSpec, EvalSpec, ParentSpec
from portfolio.store.backends import open_store
from portfolio.store.base import ArtifactStore

DEFAULT_DB = "sqlite:///.portfolio/registry.db"
DEFAULT_STORE = ".portfolio/store"
STATUSES = ("candidate", "active", "deprecated", "archived")


class Registry:
    """Adapters, their versions, lineage and data provenance, in a database plus a store.

    The core (versions, aliases, lineage, lifecycle) is here; the rest is grouped the way
    the CLI is: ``reg.bases``, ``reg.data``, ``reg.runs``, ``reg.evaluations``,
    ``reg.gates``, ``reg.suites``, ``reg.retention``, ``reg.routes``, ``reg.governance``,
    ``reg.events``, ``reg.webhooks``, ``reg.deployments`` (what running engines hold) and ``reg.browse``
    (read-only pages for the dashboard)."""

    def __init__(self, engine: sa.Engine, store: ArtifactStore):
        self.engine = engine
        self.store = store
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(db.writer(engine), expire_on_commit=False)
        changes.watch(self._write_sessions)
        self.bases = Bases(self)
        self.data = Datasets(self)
        self.runs = Runs(self)
        self.evaluations = Evaluations(self)
        self.gates = Gates(self)
        self.suites = Suites(self)
        self.retention = Retention(self)
        self.routes = Routes(self)
        self.governance = Governance(self)
        self.events = Events(self)
        self.webhooks = Webhooks(self)
        self.browse = Browse(self)
        self.deployments = Deployments(self)

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
        base_modules = self.bases.modules(base)
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
            return queries.adapter_summaries(session)

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

    def export_weights(self, ref: str, dest: str | os.PathLike) -> Path:
        """Write a plain version's stored files as a PEFT folder (no card; a stack is
        written by `portfolio.export.export_version`, as its merge)."""
        with self._read() as session:
            row = queries.version_row(session, ref)
            if row.status == "archived":
                raise InvalidState(f"{ref} is archived and its bytes are gone; export the version that replaced it")
            if row.kind == "stack":
                raise InvalidState(f"{ref} is a stack of other versions; export it with `portfolio export`, which writes its merge")
            base = session.get(BaseModelRow, session.get(AdapterRow, row.adapter_id).base_model_id)
            digest, config, model_id, row_id = row.artifact_digest, dict(row.lora_config), base.model_id, row.id
            row_label = model_label(session, row.id)
        try:
            weights = self.store.verified_path(digest, f"the weights of {row_label}")
        except PortfolioError:
            # archived between the read above and now: its bytes went with it, which is a
            # refusal (the version is no longer served), not damage
            with self._read() as session:
                if session.get(AdapterVersionRow, row_id).status == "archived":
                    raise InvalidState(f"{row_label} was archived while it was being read; "
                                       "export the version that replaced it") from None
            raise
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

    # -- promotion ------------------------------------------------------------------------

    def rollback(self, adapter: str, alias: str = "production", reason: str | None = None, force: bool = False) -> E.AliasEvent:
        """Move an alias back to the version it pointed at before, through its history. A
        version tainted by revoked data since is refused unless ``force`` (with a reason)."""
        with self._read() as session:
            target = quality.rollback_target(session, adapter, alias)
        # force: a rollback may return to a deprecated version; taint still needs its own force
        return self.set_alias(adapter, alias, target, reason=reason or "rollback", force=True, action="rollback", allow_tainted=force)

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
