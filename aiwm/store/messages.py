"""Collection ``messages``: Chat messages; each belongs to one conversation."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "messages"
INDEXES = catalog_indexes("conversationId")
