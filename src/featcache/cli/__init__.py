"""``featcache <verb>``: a thin command line over the library."""

from .commands import main

__all__ = ["main"]
