"""Catalog entity schemas and the specs that drive generic CRUD."""

from aiwm.models.base import Document, EntitySpec, FilterField, Input, Reference, merge_patch
from aiwm.models.catalog import ENTITIES, entity


def referrers(target: str) -> list[tuple[EntitySpec, Reference]]:
    """Every (entity, reference) whose reference points at ``target`` entities."""
    return [
        (spec, ref) for spec in ENTITIES.values() for ref in spec.references if ref.target == target
    ]


__all__ = [
    "ENTITIES",
    "Document",
    "EntitySpec",
    "FilterField",
    "Input",
    "Reference",
    "entity",
    "merge_patch",
    "referrers",
]
