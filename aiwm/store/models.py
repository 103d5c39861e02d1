"""Collection ``models``: The model registry."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "models"
INDEXES = catalog_indexes("name", "type")
