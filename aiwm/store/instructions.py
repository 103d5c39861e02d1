"""Collection ``instructions``: System prompts and guidelines that agents follow."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "instructions"
INDEXES = catalog_indexes("name", "isActive")
