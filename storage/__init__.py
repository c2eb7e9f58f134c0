"""Registry (SQLAlchemy) and artifact layout. Imports core, never ray or streamlit."""

from storage.artifacts import Artifacts
from storage.registry import Registry
from storage.settings import Settings

__all__ = ["Artifacts", "Registry", "Settings"]
