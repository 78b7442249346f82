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
