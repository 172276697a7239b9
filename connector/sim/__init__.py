"""A local OpenCTI platform double: stream store, SSE server, data generator (docs/SIMULATOR.md).

Packaged sample data (``connector/sim/data``) comes unchanged from the OpenCTI repository; see
``data/SOURCE.md``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson

from .store import SimStore

__all__ = ["SAMPLE_BUNDLES", "SimServer", "SimStore", "sample_bundle", "sample_objects"]

SAMPLE_BUNDLES = ("DATA-TEST-STIX2_v2.json", "poisonivy.json", "data-test-stix-e2e.json")


def sample_bundle(name: str) -> dict[str, Any]:
    """A packaged sample: a bundle file, or a stream-events array wrapped into a bundle."""
    raw = orjson.loads(resources.files(__package__).joinpath("data", name).read_bytes())
    if isinstance(raw, list):
        return {"type": "bundle", "id": f"bundle--{name}", "objects": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{name} is not a STIX bundle")
    return raw


def sample_objects() -> list[dict[str, Any]]:
    """Every object of the three packaged sample bundles (the demo's seed)."""
    out: list[dict[str, Any]] = []
    for name in SAMPLE_BUNDLES:
        out.extend(sample_bundle(name).get("objects") or [])
    return out


def __getattr__(name: str) -> Any:
    # The server imports http.server; load it only when asked for.
    if name == "SimServer":
        from .server import SimServer

        return SimServer
    raise AttributeError(name)
