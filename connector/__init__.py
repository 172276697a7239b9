"""opencti-sync: follow an OpenCTI live stream into a crash-safe archive and other platforms."""

__version__ = "0.1.0"
__all__ = ["__version__"]
