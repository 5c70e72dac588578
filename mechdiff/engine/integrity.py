"""Proof that a store holds what its done flags claim.

Why a checksum codec and a chunk grid, and no per-shard manifest: every array of a format-2 store ends its
codec chain with zarr v3's ``crc32c`` codec, so each chunk carries the checksum of its own bytes and any
reader (plain ``xarray.open_zarr`` included) fails on a flipped or truncated chunk. Which chunks a finished
shard must have follows from the array metadata alone (shape, chunk shape, captured layers and positions),
so a deleted chunk is found by one listing of the group, with no extra object to write, read or keep in
step per shard. Two things this does not catch: a chunk swapped for another valid chunk of the same array,
and damage to the metadata documents themselves (those fail loudly when the group is opened).

Sharded arrays (format 3): the objects are shard objects (each a run of inner chunks followed by an index of
(offset, length) pairs that ends with its own crc32c), and everything above holds per object: a missing one
is found by the listing, and a truncated or flipped one fails the index's or an inner chunk's crc32c.

Zarr reads a missing chunk as the fill value (NaN) and raises nothing; :class:`CheckedStore` wraps the store
that readers see so that a missing or corrupt chunk of a finished shard raises :class:`StoreCorruptError`
naming the array, the shard and the fix, at the moment it is read.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Sequence

from zarr.storage import WrapperStore

from mechdiff.errors import StoreCorruptError

__all__ = ["ArrayGrid", "ChunkProblem", "IntegrityReport", "CheckedStore", "list_keys", "check_chunks", "has_crc"]

PROGRESS = "_progress"


def has_crc(za: Any) -> bool:
    """Whether the array's codec chain ends with a crc32c checksum."""
    codecs = getattr(za.metadata, "codecs", ())
    if len(codecs) == 1 and type(codecs[0]).__name__ == "ShardingCodec":
        codecs = codecs[0].codecs  # a sharded array: each inner chunk's chain
    return bool(codecs) and type(codecs[-1]).__name__ == "Crc32cCodec"


def crc_ok(data: bytes) -> bool:
    """The crc32c codec appends the little-endian crc32c of the bytes before it."""
    import google_crc32c

    if len(data) < 4:
        return False
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


@dataclass(frozen=True)
class ArrayGrid:
    """The chunks of one array that its writes fill, per shard.

    ``per_shard=False`` (coords, token ids): every chunk of the grid is written when the group is created.
    ``per_shard=True`` (activations): a shard fills the chunks of its examples at the captured layers and
    positions; the others stay unwritten and read as NaN by design.
    """

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    per_shard: bool
    shard_size: int
    crc: bool
    separator: str = "/"
    # per dim after the example dim: the chunk indices a write touches
    fixed: tuple[tuple[int, ...], ...] = field(default=())
    # sharded arrays: ``chunks`` is the shard objects' shape, ``inner`` the inner chunks'; () when unsharded
    inner: tuple[int, ...] = field(default=())

    @property
    def sharded(self) -> bool:
        return bool(self.inner)

    @classmethod
    def for_array(
        cls,
        za: Any,
        name: str,
        shard_size: int,
        *,
        layer_index: Sequence[int] | None = None,
        positions: tuple[int, int] | None = None,
    ) -> ArrayGrid:
        """``layer_index``: where the captured layers sit in the array's layer dim (activations only);
        ``positions``: the (start, stop) slots of the position dim the array fills."""
        shape, inner = tuple(za.shape), tuple(za.chunks)
        # the objects in the store: shard objects when sharded, else the chunks themselves
        sharded = bool(getattr(za, "shards", None))
        chunks = tuple(za.shards) if sharded else inner
        enc = za.metadata.chunk_key_encoding
        sep = getattr(enc, "separator", "/")
        per_shard = layer_index is not None
        fixed: list[tuple[int, ...]] = []
        for d in range(1, len(shape)):
            n_chunks = -(-shape[d] // chunks[d])
            if per_shard and d == 1:
                fixed.append(tuple(sorted({int(i) // chunks[1] for i in layer_index})))
            elif per_shard and positions is not None and d == 2:
                lo, hi = positions
                fixed.append(tuple(range(lo // chunks[2], -(-hi // chunks[2]))))
            else:
                fixed.append(tuple(range(n_chunks)))
        return cls(name, shape, chunks, per_shard, shard_size, has_crc(za), sep, tuple(fixed), inner if sharded else ())

    def shard_problem(self, data: bytes) -> str | None:
        """For a sharded array: what is wrong with one whole shard object, or None. The index ends with the
        crc32c of the (offset, length) pairs before it (zarr's default index codecs), each inner chunk with
        its own (the array's codec chain)."""
        import numpy as np

        n_inner = 1
        for c, i in zip(self.chunks, self.inner):
            n_inner *= c // i
        size = 16 * n_inner + 4
        if len(data) < size or not crc_ok(data[-size:]):
            return "checksum mismatch"  # truncated, or a flipped index
        index = np.frombuffer(data[-size:-4], dtype="<u8").reshape(n_inner, 2)
        body = len(data) - size
        empty = np.iinfo(np.uint64).max
        present = index[:, 0] != empty
        if not present.any():
            return "checksum mismatch"  # a shard object of no chunks is never written
        for off, ln in index[present]:
            if off + ln > body or (self.crc and not crc_ok(data[int(off) : int(off + ln)])):
                return "checksum mismatch"
        return None

    def key(self, coords: Iterable[int]) -> str:
        """The chunk's key relative to the array (zarr v3 default encoding: ``c.0.3.0`` or ``c/0/3/0``)."""
        return "c" + "".join(f"{self.separator}{c}" for c in coords)

    def _example_chunks(self, shard: int | None) -> range:
        ce = self.chunks[0]
        if shard is None:
            return range(-(-self.shape[0] // ce))
        start = shard * self.shard_size
        stop = min(start + self.shard_size, self.shape[0])
        return range(start // ce, -(-stop // ce))

    def keys(self, shard: int | None = None) -> list[str]:
        """Keys of the chunks that shard ``shard`` writes (or, for a per-group array, all of them)."""
        if len(self.shape) == 0:
            return ["c"]
        return [self.key(c) for c in product(self._example_chunks(shard if self.per_shard else None), *self.fixed)]

    def shard_of(self, key: str) -> int | None:
        """The shard a chunk key belongs to, or None if no finished shard must have it."""
        parts = key.split(self.separator)
        if parts[0] != "c" or len(parts) != len(self.shape) + 1:
            return None
        try:
            coords = [int(p) for p in parts[1:]]
        except ValueError:
            return None
        if any(c not in f for c, f in zip(coords[1:], self.fixed)):
            return None
        if not self.per_shard:
            return -1
        return coords[0] * self.chunks[0] // self.shard_size


@dataclass(frozen=True)
class ChunkProblem:
    array: str
    shard: int | None  # None: a per-group array (coords, token ids)
    key: str
    problem: str  # "missing" or "checksum mismatch"

    def line(self, url: str, group: str) -> str:
        where = f"shard {self.shard}" if self.shard is not None else "written at creation"
        return f"store {url} group {group or '/'}: array {self.array} ({where}) chunk {self.key} is {self.problem}"


@dataclass
class IntegrityReport:
    """What a check found: ``level`` is ``listing`` (presence) or ``checksum`` (presence and every byte)."""

    url: str
    group: str
    level: str
    n_shards: int
    done: list[int]
    problems: list[ChunkProblem]
    chunks_checked: int

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_shards(self) -> list[int]:
        return sorted({p.shard for p in self.problems if p.shard is not None})

    @property
    def group_damaged(self) -> bool:
        """A chunk written at creation (coords, token ids) is damaged: no shard rewrite can repair it."""
        return any(p.shard is None for p in self.problems)

    def summary(self) -> str:
        if self.ok:
            return f"{self.chunks_checked} chunks of {len(self.done)} finished shards present" + (
                " and their checksums match" if self.level == "checksum" else ""
            )
        first = self.problems[0]
        return f"{len(self.problems)} damaged chunk(s) in shards {self.damaged_shards or '-'}; first: {first.array} {first.key} {first.problem}"


# ---------------------------------------------------------------------------------------------
# listing and checking


def list_keys(store: Any, prefix: str) -> set[str]:
    """Every key under ``prefix`` (relative to it), in one listing of the store."""
    prefix = prefix.strip("/")
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        out: set[str] = set()
        base = root / prefix
        if base.is_dir():
            _scan(str(base), "", out)
        return out

    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(fs, "invalidate_cache"):
        # fsspec caches listings per filesystem instance: chunks other processes wrote since would look missing
        fs.invalidate_cache()

    async def collect() -> set[str]:
        n = len(prefix) + 1 if prefix else 0
        return {k[n:] async for k in store.list_prefix(prefix)}

    from zarr.core.sync import sync

    return sync(collect())


def _scan(path: str, rel: str, out: set[str]) -> None:
    # scandir's entry types need no stat per file (LocalStore.list_prefix stats every one)
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                _scan(e.path, f"{rel}{e.name}/", out)
            elif not e.name.endswith(".partial"):  # a write that never finished
                out.add(rel + e.name)


def check_chunks(
    store: Any,
    group: str,
    grids: Sequence[ArrayGrid],
    done: Sequence[int],
    *,
    checksums: bool = False,
    present: set[str] | None = None,
    concurrency: int = 64,
) -> tuple[list[ChunkProblem], int]:
    """Check that every chunk the done shards (and the group's creation) wrote is present, and with
    ``checksums`` that its bytes match its crc32c. Returns the problems and the number of chunks checked."""
    prefix = f"{group}/" if group else ""
    if present is None:
        present = list_keys(store, group)
    problems: list[ChunkProblem] = []
    to_read: list[tuple[ArrayGrid, int | None, str]] = []
    n_checked = 0
    for g in grids:
        owners: Iterable[int | None] = done if g.per_shard else [None]
        head = f"{g.name}/"
        for s in owners:
            for k in g.keys(s):
                n_checked += 1
                if head + k not in present:
                    problems.append(ChunkProblem(g.name, s, k, "missing"))
                elif checksums and g.crc:
                    to_read.append((g, s, k))
    if to_read:
        problems += _read_and_check(store, prefix, to_read, concurrency)
    problems.sort(key=lambda p: (p.shard if p.shard is not None else -1, p.array, p.key))
    return problems, n_checked


def _read_and_check(store: Any, prefix: str, items: list[tuple[ArrayGrid, int | None, str]], concurrency: int) -> list[ChunkProblem]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()

    async def one(sem: asyncio.Semaphore, g: ArrayGrid, s: int | None, k: str) -> ChunkProblem | None:
        async with sem:
            buf = await store.get(f"{prefix}{g.name}/{k}", proto)
        if buf is None:
            return ChunkProblem(g.name, s, k, "missing")
        data = buf.to_bytes()
        bad = g.shard_problem(data) if g.sharded else (None if crc_ok(data) else "checksum mismatch")
        return None if bad is None else ChunkProblem(g.name, s, k, bad)

    async def run() -> list[ChunkProblem]:
        sem = asyncio.Semaphore(concurrency)
        found = await asyncio.gather(*(one(sem, g, s, k) for g, s, k in items))
        return [p for p in found if p is not None]

    return sync(run())


# ---------------------------------------------------------------------------------------------
# checked reads


class CheckedStore(WrapperStore):
    """A read-only view of a zarr store that refuses missing or corrupt chunks of finished shards.

    Chunks of unfinished shards, and layers or positions an array never captured, read as NaN as before.
    """

    def __init__(self, inner: Any, url: str, group: str, grids: Sequence[ArrayGrid], done: Iterable[int], fix: str):
        super().__init__(inner)
        self._url, self._group, self._fix = url, group, fix
        self._grids = {g.name: g for g in grids}
        self._done = frozenset(done)
        self._prefix = f"{group}/" if group else ""

    def _owner(self, key: str) -> tuple[ArrayGrid, int | None] | None:
        if not key.startswith(self._prefix):
            return None
        name, _, rest = key[len(self._prefix) :].partition("/")
        g = self._grids.get(name)
        if g is None:
            return None
        s = g.shard_of(rest)
        if s is None or (g.per_shard and s not in self._done):
            return None
        return g, (s if g.per_shard else None)

    def _raise(self, g: ArrayGrid, s: int | None, key: str, problem: str) -> None:
        chunk = key[len(self._prefix) + len(g.name) + 1 :]
        raise StoreCorruptError(f"{ChunkProblem(g.name, s, chunk, problem).line(self._url, self._group)}; {self._fix}")

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        owner = self._owner(key)
        if owner is not None:
            g, s = owner
            if buf is None:
                self._raise(g, s, key, "missing")
            if g.sharded:
                # zarr reads a shard object whole, its index (a suffix ending with the index's crc32c) or one
                # inner chunk (a range ending with that chunk's crc32c)
                from zarr.abc.store import RangeByteRequest, SuffixByteRequest

                data = buf.to_bytes()
                if byte_range is None:
                    bad = g.shard_problem(data) is not None
                elif isinstance(byte_range, SuffixByteRequest):
                    bad = not crc_ok(data)
                elif isinstance(byte_range, RangeByteRequest):
                    bad = g.crc and not crc_ok(data)
                else:
                    bad = False
                if bad:
                    self._raise(g, s, key, "corrupt (checksum mismatch)")
            elif byte_range is None and g.crc and not crc_ok(buf.to_bytes()):
                self._raise(g, s, key, "corrupt (checksum mismatch)")
        return buf
