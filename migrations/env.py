"""Alembic environment for the portfolio registry.

Run through `portfolio db upgrade` (or `portfolio.registry.db.upgrade`), which passes an open
connection in ``config.attributes["connection"]``. Revisions never import the ORM models:
they describe the schema as it was when they were written.
"""

from alembic import context
from sqlalchemy import create_engine

from portfolio.registry import serving_rows  # noqa: F401  (its tables join Base.metadata)
from portfolio.registry.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        run_migrations(conn)
