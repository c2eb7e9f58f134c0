"""Alembic migration scripts of the registry schema (run by `storage.migrate`)."""
