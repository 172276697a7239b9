"""``opencti-sync sim``: run the stream simulator as a standalone process (docs/SIMULATOR.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import orjson

from . import SAMPLE_BUNDLES, sample_bundle
from .generator import bulk_creates, generate
from .server import SimServer
from .store import SimStore

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opencti-sync sim", description="Local OpenCTI stream simulator (SSE + control API)."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--token", default="sim-token", help="BYPASS bearer token")
    p.add_argument(
        "--seed",
        action="append",
        default=[],
        metavar="FILE",
        help="STIX bundle (or object array) to load; 'samples' loads the packaged samples",
    )
    p.add_argument("--heartbeat", type=float, default=5.0, metavar="SECS")
    p.add_argument("--trim", type=int, default=None, metavar="N", help="keep at most N events")
    p.add_argument("--restricted-token", default=None)
    p.add_argument("--restricted-marking", action="append", default=[], metavar="ID")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="generate N events")
    p.add_argument("--generate-mix", choices=("mixed", "creates"), default="mixed")
    p.add_argument("--generate-seed", type=int, default=0)
    p.add_argument("--bulk", type=int, default=0, metavar="N", help="N fast ~2 KB creates")
    return p


def _load_seed(store: SimStore, spec: str) -> int:
    if spec == "samples":
        # One load, so relationships can point at objects of another sample file.
        return store.load_bundle(
            [o for name in SAMPLE_BUNDLES for o in sample_bundle(name)["objects"]]
        )
    data = orjson.loads(Path(spec).read_bytes())
    if isinstance(data, list):
        data = {"type": "bundle", "objects": data}
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: not a STIX bundle")
    return store.load_bundle(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = SimStore(trim=args.trim)
    try:
        for spec in args.seed:
            _load_seed(store, spec)
    except (OSError, ValueError) as exc:
        print(f"sim: cannot load seed: {exc}", file=sys.stderr)
        return 2
    if args.generate:
        generate(store, args.generate, seed=args.generate_seed, mix=args.generate_mix)
    if args.bulk:
        bulk_creates(store, args.bulk, seed=args.generate_seed)
    sim = SimServer(
        host=args.host,
        port=args.port,
        token=args.token,
        store=store,
        heartbeat_secs=args.heartbeat,
        restricted_token=args.restricted_token,
        restricted_markings=args.restricted_marking,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        sim.start()
    except OSError as exc:
        print(f"sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"sim listening on {sim.url}", flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0
