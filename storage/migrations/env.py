"""Alembic environment for the registry, configured in code by `storage.migrate.alembic_config`.

Normally handed a live connection (inside the transaction that holds the migration lock);
with only a URL (tooling such as `command.revision(..., autogenerate=True)`) it opens its own.
"""

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from storage.registry import Base, engine_url

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=engine_url(config.get_main_option("sqlalchemy.url")), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _configure(conn)
else:
    engine = create_engine(engine_url(config.get_main_option("sqlalchemy.url")), poolclass=NullPool)
    with engine.connect() as conn:
        _configure(conn)
    engine.dispose()
