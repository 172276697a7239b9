"""Small scenes made in a simulator's store, shared by tests."""

from __future__ import annotations

from connector.sim.store import SimStore

__all__ = ["merge_to_come"]


def merge_to_come(store: SimStore, tag: str) -> tuple[str, str, str]:
    """Two malware, ``absorbed`` and ``kept``, and an intrusion set that uses ``absorbed``:
    ``(absorbed, kept, uses)``, for a test to merge ``absorbed`` into ``kept`` later (the
    relationship then follows the merge without an event of its own). ``tag``: two digits that
    keep the ids apart from other tests' (``...000000000<tag>1`` to ``<tag>4``)."""
    absorbed, kept = (f"malware--00000000-0000-4000-8000-000000000{tag}{n}" for n in (1, 2))
    user = f"intrusion-set--00000000-0000-4000-8000-000000000{tag}3"
    uses = f"relationship--00000000-0000-4000-8000-000000000{tag}4"
    for stix_id, name in ((absorbed, "absorbed"), (kept, "kept")):
        store.create({"type": "malware", "id": stix_id, "name": name, "is_family": True})
    store.create({"type": "intrusion-set", "id": user, "name": "user"})
    store.create(
        {
            "type": "relationship",
            "id": uses,
            "relationship_type": "uses",
            "source_ref": user,
            "target_ref": absorbed,
        }
    )
    return absorbed, kept, uses
