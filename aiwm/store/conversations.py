"""Collection ``conversations``: Chat conversations with agents."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "conversations"
INDEXES = catalog_indexes("agentId", "status")
