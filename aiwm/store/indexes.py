"""Index helpers shared by the per-collection modules."""

from __future__ import annotations

from pymongo import ASCENDING, DESCENDING, IndexModel


def catalog_indexes(*fields: str) -> list[IndexModel]:
    """Unique id per org, newest-first listing, plus one index per filter field given."""
    return [
        IndexModel([("orgId", ASCENDING), ("id", ASCENDING)], unique=True, name="org_id"),
        IndexModel(
            [("orgId", ASCENDING), ("deletedAt", ASCENDING), ("createdAt", DESCENDING)],
            name="org_live_created",
        ),
        *(IndexModel([("orgId", ASCENDING), (f, ASCENDING)], name=f"org_{f}") for f in fields),
    ]
