"""Collection ``deployments``: Model deployments; references a model and a node."""

from aiwm.store.indexes import catalog_indexes

COLLECTION = "deployments"
INDEXES = catalog_indexes("modelId", "nodeId", "status")
