"""Collection ``nodes``: Nodes registered by operators; NodeProxy fills status and telemetry (node channel issue)."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "nodes"
INDEXES = catalog_indexes("status", "name")
