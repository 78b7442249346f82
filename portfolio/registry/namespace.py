"""The base of the registry's API groups (``reg.routes``, ``reg.suites``, ``reg.data``, …):
each is a view on one `Registry`, sharing its sessions, its store and its caches, so a
group is a place to find a method, not a second connection."""

from __future__ import annotations

from typing import Any


class Namespace:
    """One group of `Registry` methods; ``self._registry`` is the registry it belongs to."""

    def __init__(self, registry: Any):
        self._registry = registry

    @property
    def store(self):
        """The registry's artifact store."""
        return self._registry.store

    def _read(self):
        return self._registry._read()

    def _write(self):
        return self._registry._write()
