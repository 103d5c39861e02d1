"""Collection ``agents``: AI agents; reference an instruction, a model and tools."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "agents"
INDEXES = catalog_indexes("instructionId", "modelId", "toolIds")
