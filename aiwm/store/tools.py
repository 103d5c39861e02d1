"""Collection ``tools``: MCP and other tools that agents call."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "tools"
INDEXES = catalog_indexes("name", "type")
