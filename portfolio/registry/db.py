"""Engine, the one session scope, and schema migrations.

Every registry operation runs inside `session_scope`: it commits or rolls back as a whole,
turns on foreign keys for SQLite, and maps database errors to `PortfolioError`s.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Engine
from alembic.script.revision import ResolutionError
from alembic.util.exc import CommandError
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from portfolio.errors import AlreadyExists, DatabaseError, SchemaOutOfDate


def migrations_dir() -> Path:
    """The Alembic script folder, in a source checkout or an installed package."""
    spec = importlib.util.find_spec("portfolio.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "migrations"


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def create_engine(url: str) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite gets foreign keys and a busy timeout."""
    try:
        parsed = sa.engine.make_url(url)
    except ArgumentError:
        raise DatabaseError(
            f"cannot parse database URL {url!r}; use e.g. sqlite:///registry.db or "
            "postgresql+psycopg://user@host:5432/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # Python's sqlite3 commits before DDL on its own, so a failed migration would
            # leave half its changes behind: take transaction control away from it and
            # emit BEGIN ourselves (SQLAlchemy's documented recipe for transactional DDL).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # noqa: ANN001
            # A deferred BEGIN that later writes is upgraded to a writer under WAL, and that
            # upgrade fails with SQLITE_BUSY at once, ignoring the busy timeout: a write
            # transaction must begin as a writer, so concurrent writers queue instead of failing.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

        return engine
    try:
        return sa.create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError:
        raise DatabaseError(
            f"unknown database kind {parsed.drivername!r} in {redact(url)}; use sqlite:///FILE or "
            "postgresql+psycopg://user@host:5432/db"
        ) from None
    except ModuleNotFoundError as exc:
        raise DatabaseError(
            f"no driver for {redact(url)} ({exc.name} is not installed); for PostgreSQL use "
            "postgresql+psycopg://... (psycopg 3 ships with portfolio)"
        ) from None


WRITE_OPTION = "portfolio_write"


def writer(engine: Engine) -> Engine:
    """The same engine for transactions that write: on SQLite they begin ``IMMEDIATE``."""
    return engine.execution_options(**{WRITE_OPTION: True})


def lock_name(session: Session, kind: str, name: str) -> None:
    """Serialise writers that number or create things called ``name`` (the next dataset or
    adapter version is max + 1): on PostgreSQL a transaction-scoped advisory lock; on
    SQLite write transactions are already serial (``BEGIN IMMEDIATE``)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(f"{kind}:{name}".encode()).digest()[:8], "big", signed=True)
    session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def insert_ignore(session: Session, table: sa.Table, values: dict) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING``; return whether the row was inserted. On
    PostgreSQL it waits for a concurrent transaction that inserted the same key."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    key = list(table.primary_key.columns)[0]
    result = session.execute(insert(table).values(**values).on_conflict_do_nothing().returning(key))
    return result.first() is not None


def insert_many_ignore(session: Session, table: sa.Table, rows: list[dict]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` of many rows in one statement."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(table).values(rows).on_conflict_do_nothing())


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at the packaged migrations and this engine's URL."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DBAPIError as exc:
        raise DatabaseError(
            f"cannot connect to the registry at {redact(str(engine.url))}: {_first_line(exc)}; "
            "check --db / PORTFOLIO_DB"
        ) from None


def has_tables(engine: Engine) -> bool:
    """Whether the database holds any table at all."""
    return bool(sa.inspect(engine).get_table_names())


def _migrate(engine: Engine, fn, revision: str) -> None:
    """Run an Alembic command in one transaction. On SQLite, foreign keys are switched off for
    the duration (batch mode recreates tables, and dropping a referenced table would fail)
    and checked afterwards; a failure rolls everything back, leaving the old revision."""
    cfg = alembic_config(engine)
    sqlite = engine.dialect.name == "sqlite"
    before = current_revision(engine)
    try:
        with engine.connect() as conn:
            if sqlite:  # outside any transaction, where SQLite honours it
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    cfg.attributes["connection"] = conn
                    fn(cfg, revision)
                    if sqlite:
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise DatabaseError(f"migration to {revision} would break {len(broken)} foreign keys; nothing was changed")
            finally:
                if sqlite:
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"migrating the registry to {revision} failed ({_first_line(exc)}); it was left at revision {before or 'empty'}"
        ) from exc
    except (CommandError, ResolutionError, KeyError) as exc:
        known = ", ".join(s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions())
        raise DatabaseError(
            f"no migration path to revision {revision!r} ({_first_line(exc)}); use head, base or one of {known}"
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the schema to ``revision``; return (from, to). All in one transaction."""
    before = current_revision(engine)
    _migrate(engine, command.upgrade, revision)
    return before, current_revision(engine)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Migrate the schema down to ``revision`` (``base`` empties it)."""
    before = current_revision(engine)
    _migrate(engine, command.downgrade, revision)
    return before, current_revision(engine)


def check_schema(engine: Engine) -> None:
    """Raise `SchemaOutOfDate` unless the database is at the head revision."""
    current = current_revision(engine)
    head = head_revision(engine)
    if current == head:
        return
    where = redact(str(engine.url))
    try:
        known = ScriptDirectory.from_config(alembic_config(engine)).get_revision(current) is not None
    except (CommandError, ResolutionError, KeyError):
        known = False
    if current is not None and not known:
        raise SchemaOutOfDate(
            f"the registry at {where} is at revision {current}, which this portfolio does not know: a newer "
            f"portfolio made it; upgrade portfolio (this one reaches {head})"
        )
    if current is None:
        raise SchemaOutOfDate(
            f"the registry at {where} is not initialised; run `portfolio init` "
            "(or `portfolio db upgrade`)"
        )
    raise SchemaOutOfDate(
        f"the registry schema at {where} is at revision {current} but this portfolio needs "
        f"{head}; run `portfolio db upgrade`"
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", exc) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error, map DB errors."""
    session = factory()
    try:
        yield session
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise AlreadyExists(f"the registry refused the change: {_first_line(exc)}") from exc
    except (OperationalError, DataError) as exc:
        session.rollback()
        raise DatabaseError(f"registry database error: {_first_line(exc)}") from exc
    except DBAPIError as exc:
        session.rollback()
        raise DatabaseError(f"registry database error: {_first_line(exc)}; check --db / PORTFOLIO_DB") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
