"""The archive: segments of stream events, their manifests, and the readers and writers of both.

The on-storage format is a public contract documented in docs/ARCHIVE.md.
"""

from .reader import ArchiveReader, SegmentRef
from .segment import Manifest
from .sink import ArchiveSink

__all__ = ["ArchiveReader", "ArchiveSink", "Manifest", "SegmentRef"]
