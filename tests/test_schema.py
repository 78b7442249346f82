"""The migrations and the ORM models describe the same schema, on every backend."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from portfolio.registry import db
from portfolio.registry.models import Base


def test_upgrade_to_head_matches_models(db_url):
    engine = db.create_engine(db_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert not diff, (
        "the ORM models and the migrations differ; write a revision with "
        "`alembic -c <cfg> revision --autogenerate` (see docs/architecture.md), differences: "
        f"{diff}"
    )


def test_downgrade_to_base_removes_everything(db_url):
    engine = db.create_engine(db_url)
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision(engine)
    db.downgrade(engine, "base")
    tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set()
    assert db.current_revision(engine) is None
    db.upgrade(engine)  # and back up again
    assert db.current_revision(engine) == db.head_revision(engine)
    engine.dispose()


def test_migrations_keep_the_data_of_a_populated_registry(db_url, store_dir, tiny_base, lora_dir, write_jsonl):
    """Down to the first revision and back up, with versions, edges and aliases in place
    (SQLite's batch mode recreates referenced tables: foreign keys must survive that)."""
    from portfolio import Registry

    with Registry.open(db_url, store_dir) as reg:
        reg.bases.add("tiny", tiny_base)
        reg.data.add("docs", [write_jsonl("d.jsonl", [{"text": "a"}, {"text": "b"}])], "python")
        reg.import_adapter("py", lora_dir, "tiny", data=["docs@1"])
        reg.import_adapter("py", lora_dir, "tiny", parents=["py@1"])
        reg.set_alias("py", "production", 2)
        engine = reg.engine
        db.downgrade(engine, "0001")
        assert db.current_revision(engine) == "0001"
        db.upgrade(engine)
        lin = reg.lineage("py@production")
        assert [v.ref for v in lin.versions] == ["py@2", "py@1"]
        assert [d.snapshot for d in lin.data] == ["docs@1"]


def test_a_failed_migration_leaves_no_trace(db_url):
    """DDL runs inside the migration's transaction on every backend (on SQLite too, where
    Python's sqlite3 would otherwise commit before each DDL statement)."""
    engine = db.create_engine(db_url)
    db.upgrade(engine)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN half_done INTEGER")
            raise RuntimeError("migration step failed")
    except RuntimeError:
        pass
    assert "half_done" not in {c["name"] for c in sa.inspect(engine).get_columns("runs")}
    engine.dispose()
