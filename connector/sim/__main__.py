"""``python -m connector.sim``: same as ``opencti-sync sim``."""

from __future__ import annotations

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
