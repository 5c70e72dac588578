"""The root of mechdiff's own errors.

Every error that mechdiff raises on purpose (bad input, a store that does not match or is damaged, a cluster
that cannot be reached) derives from :class:`MechdiffError`, so a caller catches them all with one clause and
the command line prints them as one line. Each subclass also keeps the builtin base it had (ValueError,
OSError, ...), so code that caught those goes on working.
"""

from __future__ import annotations

__all__ = ["MechdiffError", "StoreCorruptError"]


class MechdiffError(Exception):
    """An error mechdiff raised on purpose; its message is one line a user can act on."""


class StoreCorruptError(MechdiffError, ValueError):
    """A shard marked done lacks a chunk, or a chunk's bytes fail their checksum."""
