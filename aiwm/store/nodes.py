"""Collection ``nodes``: registered by operators; NodeProxy (node channel) fills status and telemetry."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "nodes"
INDEXES = catalog_indexes("status", "name")
