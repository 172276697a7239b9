"""Sinks that apply the stream to another OpenCTI platform."""

from __future__ import annotations

from .opencti import OpenCTITarget

__all__ = ["OpenCTITarget"]
