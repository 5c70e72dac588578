"""The Zarr v3 activation store.

One Zarr v3 group per (model, dataset) inside a store root, e.g. ``out/store.zarr`` group
``base/truth_cities``. ``xarray.open_zarr(url, group=...)`` opens a group as a Dataset with named dims:

* data vars, one per captured site: dims ``(example, layer[, position], hidden|neuron)``;
* coords ``example``, ``layer``, ``position`` (negative offsets from each example's own end),
  ``n_tokens``, ``text``, the dataset's other columns, and ``token_ids`` (example, tok), right-aligned
  with -1 padding, ``tok`` = negative offsets from the end;
* attrs: the caller's provenance plus ``created``, ``n_examples``, ``shard_size``, ``n_shards`` and
  ``mechdiff_store`` (format version and the array specs).

Work is split into shards of ``shard_size`` examples. Example chunks never straddle a shard, so
processes writing different shards never touch the same object. Each shard has a done flag in the
sub-group ``_progress`` (bool array ``done``, chunk size 1: one object per flag); ``open_zarr`` of the
group does not see it. A flag is set only after all of its shard's data has been written.

The skeleton (metadata, coords, token ids, flags) is made with zarr-python in the layout xarray's
``to_zarr`` gives (``_FillValue`` and ``coordinates`` attrs included), so plain ``xarray.open_zarr``
reads it, without importing xarray on the extraction path; shard writes go through zarr-python too.

Arrays may capture different layer sets (e.g. ``mlp_act`` at the last layer only): the ``layer``
coord is the union, and layers an array did not capture are never written and read as NaN (the
array's ``captured_layers`` attr lists the real ones). Likewise an array capturing fewer positions
than the store's ``position`` coord fills its last ``n_positions`` entries.

Format 3 (the default) stores each activation array with zarr v3's sharding codec: the inner chunks are
format 2's chunks (one layer of a chunk of examples, contiguous, at most MAX_CHUNK_BYTES), packed into shard
objects sized toward MIN_SHARD_BYTES..MAX_SHARD_BYTES that never straddle two work shards, so concurrent
writers still never touch the same object while a store holds ~30x fewer objects. ``sharded=False`` writes
format 2 (one object per chunk); both are read the same way.

Arrays may be stored as float16, bfloat16 or float32. numpy has no bfloat16: a bfloat16 array is stored as
its uint16 bit pattern (attr ``mechdiff_dtype: bfloat16``); :func:`open_store` returns it as float32, lazily
and exactly; plain ``xarray.open_zarr`` shows the uint16 bits.

The example dimension can grow by whole work shards (:meth:`ActivationStore.extend`), resumably.

The root of the store holds consolidated metadata, written once by :meth:`ActivationStore.finish` (or
:func:`consolidate`) when a run completes, so that plain ``xarray.open_zarr(url, group=...)`` opens without a
consolidated-metadata warning. Creating a group or extending one drops the root's copy first (one small
write), so plain readers never get stale shapes: until the next finish they read the hierarchy itself (zarr
warns). mechdiff's own readers never use it (``consolidated=False``), so they always see the current hierarchy.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from mechdiff.errors import MechdiffError, StoreCorruptError

if TYPE_CHECKING:
    from mechdiff.engine.integrity import ArrayGrid, IntegrityReport

__all__ = [
    "ArraySpec",
    "ActivationStore",
    "ArrayInfo",
    "GroupInfo",
    "StoreMismatchError",
    "StoreIncompleteError",
    "StoreCorruptError",
    "cast_to_spec",
    "open_store",
    "resolve_group",
    "differing_fields",
    "list_groups",
    "store_info",
    "consolidate",
    "MAX_CHUNK_BYTES",
    "MAX_SHARD_BYTES",
]

#: Upper bound on the uncompressed size of one chunk of activations (an inner chunk, when sharded).
MAX_CHUNK_BYTES = 16 * 2**20
#: Shard objects grow toward this many uncompressed bytes (fewer objects per TB, each a sensible PUT) ...
MAX_SHARD_BYTES = 512 * 2**20
#: ... and are this big or more where the work shard holds that much (smaller arrays give smaller shards).
MIN_SHARD_BYTES = 64 * 2**20
# 2: every array ends its codec chain with crc32c, coords are written even where they equal the fill value,
# chunk keys are flat ("c.0.3.1"), and a pending note marks a group still being created
# 3: activation arrays use the sharding codec (or a bfloat16 array is present), the example dim may be extended
FORMAT_VERSION = 3

_MARKER = "mechdiff_store"
# Set while a group is being created and replaced by the marker as the creation's last write.
_PENDING = "mechdiff_pending"
# Set while the example dim is being extended (the target size); removed by the extension's last write.
_EXTENDING = "mechdiff_extending"
# "coordinates" is written as xarray writes it (coords that no data var carries, e.g. token_ids).
_RESERVED_ATTRS = (_MARKER, _PENDING, _EXTENDING, "created", "n_examples", "shard_size", "n_shards", "coordinates")
_PROGRESS = "_progress"
_DONE = "done"
_DIMS = ("example", "layer", "position", "hidden", "neuron", "tok")
_RESERVED_NAMES = set(_DIMS) | {"token_ids", _PROGRESS}
_DTYPES = ("float16", "bfloat16", "float32")
# bfloat16 is stored as its bit pattern: the upper half of a float32
_BF16_BITS = np.dtype(np.uint16)
_BF16_NAN = 0x7FC0
# Chunk keys "c.0.3.1" in one directory per array, not a directory per index: listing a store (what proves it
# complete, and plans a resume) then reads a few directories instead of one per example chunk and layer.
_FLAT_KEYS = {"name": "default", "separator": "."}


class StoreMismatchError(MechdiffError, ValueError):
    """An existing group was made by a different model / tokenizer / dataset / capture spec."""


class StoreIncompleteError(MechdiffError, RuntimeError):
    """A group exists but its creation never finished, or is still running in another process."""


@dataclass(frozen=True)
class ArraySpec:
    """One captured site, stored as data var ``name`` with dims (example, layer[, position], dim).

    ``n_positions=None`` keeps one position per example and drops the position dim.
    ``compression`` is ``"zstd"``, ``"zstd:<level>"`` or None.
    """

    name: str
    site: str
    layers: tuple[int, ...]
    n_positions: int | None
    width: int
    dim: str
    dtype: str = "float16"
    compression: str | None = "zstd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if not self.name or "/" in self.name or self.name.startswith("_") or self.name in _RESERVED_NAMES:
            raise ValueError(f"ArraySpec name {self.name!r} is not allowed")
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"ArraySpec {self.name}: layers must be distinct non-negative ints, got {self.layers}")
        if self.n_positions is not None and int(self.n_positions) < 1:
            raise ValueError(f"ArraySpec {self.name}: n_positions must be >= 1 or None")
        if self.width < 1:
            raise ValueError(f"ArraySpec {self.name}: width must be >= 1")
        if self.dim not in ("hidden", "neuron"):
            raise ValueError(f"ArraySpec {self.name}: dim must be 'hidden' or 'neuron', got {self.dim!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ArraySpec {self.name}: dtype must be float16, bfloat16 or float32, got {self.dtype}")
        _compressors(self.compression)  # validates

    @property
    def dims(self) -> tuple[str, ...]:
        pos = ("position",) if self.n_positions is not None else ()
        return ("example", "layer", *pos, self.dim)

    def shard_shape(self, n: int) -> tuple[int, ...]:
        """Shape ``write_shard`` expects for ``n`` examples."""
        pos = (self.n_positions,) if self.n_positions is not None else ()
        return (n, len(self.layers), *pos, self.width)

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the stored values (and of what :func:`cast_to_spec` returns): uint16 bit
        patterns for bfloat16, else the dtype itself."""
        return _BF16_BITS if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def nbytes(self, n_examples: int) -> int:
        """Uncompressed bytes of this array's captured values for ``n_examples`` examples."""
        return int(np.prod(self.shard_shape(n_examples), dtype=np.int64)) * self.storage_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ArraySpec:
        return cls(**{**d, "layers": tuple(d["layers"])})


@dataclass(frozen=True)
class ArrayInfo:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None  # the shard objects' shape (format 3), None when unsharded


@dataclass(frozen=True)
class GroupInfo:
    """Summary of one activation group, for ``mechdiff store info``."""

    group: str
    arrays: list[ArrayInfo]
    provenance: dict[str, Any]
    fraction_done: float
    n_examples: int = 0
    shard_size: int = 0
    n_shards: int = 0
    done_shards: list[int] = field(default_factory=list)
    damaged_shards: list[int] = field(default_factory=list)  # flagged done but a chunk is missing


class ActivationStore:
    """Handle on one activation group: creation, shard writes and done flags.

    Create it in the driver with :meth:`create_or_open`; workers call :meth:`open` (or
    ``create_or_open`` with the same arguments) and write disjoint shards concurrently.
    """

    def __init__(self, url: str, group: str, zgroup: Any, storage_options: dict | None) -> None:
        # Use create_or_open / open; this only wraps an opened zarr group.
        self.url = url
        self.group = group
        self.storage_options = storage_options
        self._zgroup = zgroup
        attrs = dict(zgroup.attrs)
        if _MARKER not in attrs:
            if _PENDING in attrs:
                raise StoreIncompleteError(
                    f"store {url} group {group or '/'} is incomplete: its creation was interrupted or is still "
                    "running; the same extraction command recreates it"
                )
            raise StoreMismatchError(f"store {url} group {group or '/'} exists and is not a mechdiff activation group")
        meta = attrs[_MARKER]
        self.n_examples: int = int(attrs["n_examples"])
        self.shard_size: int = int(attrs["shard_size"])
        self.n_shards: int = int(attrs["n_shards"])
        self.arrays: list[ArraySpec] = [ArraySpec.from_json(d) for d in meta["arrays"]]
        self.provenance: dict[str, Any] = {k: v for k, v in attrs.items() if k not in _RESERVED_ATTRS}
        self.created: str = str(attrs.get("created", ""))
        self.layers: tuple[int, ...] = tuple(meta["layers"])
        self.n_positions: int | None = meta["n_positions"]
        self.format: int = int(meta.get("format", 1))
        # an extension of the example dim that has not finished: extend() with the same arguments finishes it
        self.extending: int | None = int(attrs[_EXTENDING]["n_examples"]) if _EXTENDING in attrs else None
        self._specs = {s.name: s for s in self.arrays}
        # write_empty_chunks: a finished shard always has all of its chunks, whatever their values
        self._zarrays = {s.name: _member(zgroup, s.name, url, group).with_config({"write_empty_chunks": True}) for s in self.arrays}
        self._done = _member(zgroup, f"{_PROGRESS}/{_DONE}", url, group)
        self._grids_cache: list[ArrayGrid] | None = None

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.url!r}, group={self.group!r}, arrays={[s.name for s in self.arrays]}, "
            f"n_examples={self.n_examples}, shards {len(self.done_shards())}/{self.n_shards} done)"
        )

    # ------------------------------------------------------------------ creation / opening

    @classmethod
    def create_or_open(
        cls,
        url: str | Path,
        group: str | None,
        *,
        n_examples: int,
        shard_size: int,
        arrays: list[ArraySpec],
        coords: Mapping[str, np.ndarray],
        token_ids: np.ndarray,
        provenance: Mapping[str, Any],
        identity_keys: Iterable[str] = ("model_id", "weights_hash", "tokenizer_hash", "dataset_hash", "capture"),
        storage_options: dict | None = None,
        sharded: bool = True,
    ) -> ActivationStore:
        """Create the group (coords, token ids, empty arrays, done flags) or open an existing one.

        ``sharded``: store the activation arrays with the sharding codec (format 3); False writes format 2's
        one object per chunk. An existing group keeps the layout it was made with.

        An existing group must match: the provenance values under ``identity_keys``, ``n_examples``,
        ``shard_size`` and the array specs; otherwise :class:`StoreMismatchError` names what differs
        (with both values) and nothing is touched.
        """
        url, group = _norm_url(url), _norm_group(group)
        prov = _jsonable(dict(provenance))
        clash = [k for k in prov if k in _RESERVED_ATTRS]
        if clash:
            raise ValueError(f"provenance keys {clash} are reserved by the store")
        specs = list(arrays)
        layout = _Layout.build(n_examples, shard_size, specs, coords, token_ids)  # bad arguments fail first
        # Probe read-only so that a mismatch or an error leaves no trace (r+ would make directories).
        existing = _open_zgroup(url, group, storage_options, mode="r", missing_ok=True)
        if existing is not None and _MARKER not in existing.attrs and _interrupted(existing.attrs.get(_PENDING)):
            # a creation that was killed: no shard can have been written into it, so it is safe to redo
            _delete_group(url, group, storage_options)
            existing = None
        if existing is None:
            try:
                _create(url, group, layout, prov, storage_options, sharded=sharded)
            except FileExistsError:
                pass  # another process created it meanwhile: fall through and compare
        store = cls(url, group, _open_zgroup(url, group, storage_options, mode="r+"), storage_options)
        store._check_same(prov, tuple(identity_keys), n_examples, shard_size, specs)
        return store

    @classmethod
    def open(
        cls, url: str | Path, group: str | None, storage_options: dict | None = None, *, read_only: bool = False
    ) -> ActivationStore:
        """Open an existing activation group for writing shards (or, ``read_only``, for reading progress)."""
        url, group = _norm_url(url), _norm_group(group)
        return cls(url, group, _open_zgroup(url, group, storage_options, mode="r" if read_only else "r+"), storage_options)

    def token_ids(self, rows: range) -> np.ndarray:
        """The stored token ids ``[example, tok]`` (right-aligned, -1 padded) of examples ``rows``."""
        return np.asarray(self._zgroup["token_ids"][rows.start:rows.stop])

    def check_same(
        self, provenance: Mapping[str, Any], keys: Iterable[str], n_examples: int, shard_size: int,
        arrays: Sequence[ArraySpec],
    ) -> None:
        """Raise :class:`StoreMismatchError` unless this group is the one ``create_or_open`` with these arguments
        would open: the same provenance under ``keys``, size, shard size and array specs."""
        self._check_same(_jsonable(dict(provenance)), tuple(keys), n_examples, shard_size, list(arrays))

    def _check_same(
        self, prov: dict[str, Any], keys: tuple[str, ...], n_examples: int, shard_size: int, specs: list[ArraySpec]
    ) -> None:
        where = f"store {self.url} group {self.group or '/'}"
        diffs = [k for k in keys if self.provenance.get(k) != prov.get(k)]
        if "model_id" in diffs and "weights_hash" in diffs:
            diffs.remove("weights_hash")  # already shown next to the model ids
        if diffs:
            parts = []
            for k in diffs:
                old, new = self.provenance.get(k), prov.get(k)
                if k in ("model_id", "weights_hash"):
                    old, new = self.provenance.get("model_id"), prov.get("model_id")
                    w_old = self.provenance.get("weights_hash")
                    w_new = prov.get("weights_hash")
                    parts.append(
                        f"was made by model {_short(old)}{_weights(w_old)}, this run uses model {_short(new)}{_weights(w_new)}"
                    )
                else:
                    parts.append(_field_diff(k, old, new))
            raise StoreMismatchError(f"{where} " + "; ".join(parts) + "; use another group or remove this one")
        structural = []
        if self.n_examples != n_examples:
            structural.append(f"n_examples differs: stored {self.n_examples}, this run {n_examples}")
        if self.shard_size != shard_size:
            structural.append(f"shard_size differs: stored {self.shard_size}, this run {shard_size}")
        old_specs = {s.name: s for s in self.arrays}
        new_specs = {s.name: s for s in specs}
        if old_specs != new_specs:
            for name in sorted(set(old_specs) | set(new_specs)):
                o, n = old_specs.get(name), new_specs.get(name)
                if o != n:
                    structural.append(f"array {name} differs: stored {_spec_str(o)}, this run {_spec_str(n)}")
        if structural:
            raise StoreMismatchError(f"{where}: " + "; ".join(structural) + "; use another group or remove this one")

    # ------------------------------------------------------------------ shards

    def shard_range(self, i: int) -> range:
        """Example indices of shard ``i``."""
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range 0..{self.n_shards - 1}")
        start = i * self.shard_size
        return range(start, min(start + self.shard_size, self.n_examples))

    def write_shard(self, i: int, data: Mapping[str, np.ndarray]) -> None:
        """Write all arrays of shard ``i``, then set its done flag.

        ``data[name]`` has shape ``spec.shard_shape(len(shard_range(i)))``, any float dtype. Everything
        is validated and cast before the first byte is written. Casting raises OverflowError (naming
        the array and the example index) if a finite value would become inf. Rewriting a shard
        (a retry) overwrites it.
        """
        rng = self.shard_range(i)
        missing = sorted(set(self._specs) - set(data))
        extra = sorted(set(data) - set(self._specs))
        if missing or extra:
            raise ValueError(
                f"write_shard({i}): missing arrays {missing}, unexpected arrays {extra}; expected {sorted(self._specs)}"
            )
        self._refuse_while_extending()
        prepared = {name: self._prepare(spec, data[name], rng) for name, spec in self._specs.items()}
        # A rewrite (a retry, or a repair of a damaged shard) first takes the flag down, so that a kill
        # halfway leaves the shard unfinished rather than flagged over a mix of chunks.
        self._clear_flag(i)
        # ... and removes the shard's old shard objects: zarr merges a partial write into the object already
        # there, and a truncated one would fail that merge (or carry stale inner chunks along)
        self._delete_objects(i)
        for name, values in prepared.items():
            self._write_array(name, rng, values)
        # Durable in order: the data reaches the disk before the flag that vouches for it.
        self._sync([f"{g.name}/{k}" for g in self._grids() if g.per_shard for k in g.keys(i)])
        self._mark_done(i)

    def _prepare(self, spec: ArraySpec, values: Any, rng: range) -> np.ndarray:
        arr = np.asarray(values)
        want = spec.shard_shape(len(rng))
        if arr.shape != want:
            raise ValueError(f"array {spec.name}: shape {arr.shape} for shard examples {rng.start}..{rng.stop - 1}, expected {want}")
        if spec.dtype == "bfloat16" and arr.dtype == _BF16_BITS:
            return arr  # already bfloat16 bit patterns, as cast_to_spec returns them
        if arr.dtype.kind != "f":
            raise TypeError(f"array {spec.name}: dtype {arr.dtype}, expected a float dtype")
        return cast_to_spec(spec, arr, rng)

    def _refuse_while_extending(self) -> None:
        if self.extending is not None:
            raise StoreIncompleteError(
                f"store {self.url} group {self.group or '/'} is being extended to {self.extending} examples and "
                "that extension has not finished: run the same extend again to finish it"
            )

    def _delete_objects(self, i: int) -> None:
        from zarr.core.sync import sync

        keys = [f"{g.name}/{k}" for g in self._grids() if g.per_shard and g.sharded for k in g.keys(i)]
        if not keys:
            return
        prefix = f"{self.group}/" if self.group else ""
        store = self._zgroup.store

        async def run() -> None:
            import asyncio

            await asyncio.gather(*(store.delete(prefix + k) for k in keys))

        sync(run())

    def _write_array(self, name: str, rng: range, values: np.ndarray) -> None:
        spec = self._specs[name]
        idx = [self.layers.index(layer) for layer in spec.layers]
        contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
        layer_sel: slice | np.ndarray = slice(idx[0], idx[0] + len(idx)) if contiguous else np.asarray(idx)
        sel: list[Any] = [slice(rng.start, rng.stop), layer_sel]
        if spec.n_positions is not None:
            assert self.n_positions is not None
            sel.append(slice(self.n_positions - spec.n_positions, self.n_positions))
        sel.append(slice(None))
        za = self._zarrays[name]
        if contiguous:
            za[tuple(sel)] = values
        elif za.shards is None:
            za.set_orthogonal_selection(tuple(sel), values)
        else:
            # zarr 3.1's orthogonal writes into sharded arrays fail (IndexError in the shard merge): write each
            # run of adjacent layers on its own; a later run merges into the shard object an earlier one made
            j = 0
            while j < len(idx):
                k = j
                while k + 1 < len(idx) and idx[k + 1] == idx[k] + 1:
                    k += 1
                za[(sel[0], slice(idx[j], idx[k] + 1), *sel[2:])] = values[:, j : k + 1]
                j = k + 1

    def _mark_done(self, i: int) -> None:
        self._done[i] = True
        self._sync([self._flag_key(i)])

    def _flag_key(self, i: int) -> str:
        return f"{_PROGRESS}/{_DONE}/{self._done.metadata.encode_chunk_key((i,))}"

    def _clear_flag(self, i: int) -> None:
        from zarr.core.sync import sync

        key = f"{self.group}/{self._flag_key(i)}" if self.group else self._flag_key(i)
        try:
            sync(self._zgroup.store.delete(key))
        except (FileNotFoundError, KeyError):
            pass  # not flagged

    def clear_done(self, shards: Iterable[int]) -> None:
        """Take down the done flags of ``shards`` (e.g. damaged ones), so the next extraction rewrites them."""
        for i in shards:
            self.shard_range(i)  # validates
            self._clear_flag(i)

    def _sync(self, keys: Iterable[str]) -> None:
        """fsync the files behind ``keys`` (relative to the group) and their directories, on local stores.

        Object stores need nothing here: a PUT is durable once acknowledged, and zarr awaits each PUT
        before the next write, so the done flag is only sent after its shard's data was accepted."""
        root = getattr(self._zgroup.store, "root", None)
        if not isinstance(root, Path):
            return
        base = root / self.group if self.group else root
        dirs = set()
        for k in keys:
            path = base / k
            _fsync(path)
            dirs.add(path.parent)
        for d in dirs:
            _fsync(d)

    def _grids(self) -> list[ArrayGrid]:
        """The chunk grid of every array: which chunks each shard (or the creation) writes."""
        if self._grids_cache is None:
            from mechdiff.engine.integrity import ArrayGrid

            grids = []
            for s in self.arrays:
                idx = [self.layers.index(layer) for layer in s.layers]
                pos = None
                if s.n_positions is not None:
                    assert self.n_positions is not None
                    pos = (self.n_positions - s.n_positions, self.n_positions)
                grids.append(ArrayGrid.for_array(self._zarrays[s.name], s.name, self.shard_size, layer_index=idx, positions=pos))
            if self.format >= 2:  # format 1 skipped coord chunks equal to the fill value: nothing to expect
                for name, za in self._zgroup.arrays():
                    if name not in self._specs:
                        grids.append(ArrayGrid.for_array(za, name, self.shard_size))
            self._grids_cache = grids
        return self._grids_cache

    def _listing(self) -> tuple[set[str], list[int]]:
        """One listing of the group: every key in it, and the flagged shards read off the flags' keys."""
        from mechdiff.engine.integrity import list_keys

        keys = list_keys(self._zgroup.store, self.group)
        sep = getattr(self._done.metadata.chunk_key_encoding, "separator", "/")
        head = f"{_PROGRESS}/{_DONE}/c{sep}"
        done = []
        for k in keys:
            if k.startswith(head):
                tail = k[len(head):]
                if tail.isdigit() and int(tail) < self.n_shards:
                    done.append(int(tail))
        return keys, sorted(done)

    def check(self, checksums: bool = False) -> IntegrityReport:
        """An :class:`~mechdiff.engine.integrity.IntegrityReport`: every chunk that the flagged shards and the
        creation wrote is present (one listing); with ``checksums``, every such chunk is read and its crc32c
        checked too."""
        from mechdiff.engine.integrity import IntegrityReport, check_chunks

        self._refuse_while_extending()  # the coords' new rows may not be written yet
        keys, done = self._listing()
        problems, n = check_chunks(self._zgroup.store, self.group, self._grids(), done, checksums=checksums, present=keys)
        return IntegrityReport(self.url, self.group, "checksum" if checksums else "listing", self.n_shards, done, problems, n)

    def done_shards(self) -> list[int]:
        """Shards flagged done (read from one listing; :meth:`check` proves their chunks are there)."""
        return self._listing()[1]

    def missing_shards(self) -> list[int]:
        """Shards to (re)write: those not flagged done, and flagged ones with a chunk missing. One listing."""
        rep = self.check()
        done = set(rep.done) - set(rep.damaged_shards)
        return [i for i in range(self.n_shards) if i not in done]

    def fraction_done(self) -> float:
        rep = self.check()
        return (len(rep.done) - len(rep.damaged_shards)) / self.n_shards

    # ------------------------------------------------------------------ finishing and growing

    def finish(self) -> None:
        """Consolidate the store root's metadata, once, when a run has written what it will: plain
        ``xarray.open_zarr(url, group=...)`` then opens without a warning and with one read."""
        consolidate(self.url, self.storage_options)

    def extend(
        self,
        n_new_examples: int,
        coords: Mapping[str, np.ndarray],
        token_ids: np.ndarray,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        """Grow the example dim by ``n_new_examples`` (a streamed dataset's next part), as new work shards.

        ``coords`` must have the group's example coords (same names, compatible dtypes) for the new examples,
        ``token_ids`` their right-aligned ids (at most the group's ``tok`` width; narrower rows are padded).
        ``provenance`` updates keys of the provenance (e.g. a new dataset hash) in the same last write.
        The current size must be whole work shards. Existing data and done flags are untouched; the new
        shards start not done. Interrupted, the group reads as being extended (writes and reads refuse it)
        until ``extend`` is called again with the same arguments, which finishes the job."""
        where = f"store {self.url} group {self.group or '/'}"
        old = self.n_examples
        if isinstance(n_new_examples, bool) or not isinstance(n_new_examples, (int, np.integer)) or n_new_examples < 1:
            raise ValueError(f"{where}: n_new_examples must be an int >= 1, got {n_new_examples!r}")
        if old % self.shard_size:
            raise ValueError(
                f"{where}: holds {old} examples, not whole work shards of {self.shard_size}; only a group of whole "
                "work shards can grow (its last shard would change under its done flag)"
            )
        target = old + int(n_new_examples)
        if self.extending is not None and self.extending != target:
            raise StoreIncompleteError(
                f"{where}: an extension to {self.extending} examples is unfinished; finish it first with "
                f"extend({self.extending - old}, ...) and the same coords and token ids"
            )
        prov = _jsonable(dict(provenance or {}))
        clash = [k for k in prov if k in _RESERVED_ATTRS]
        if clash:
            raise ValueError(f"provenance keys {clash} are reserved by the store")
        new = self._extension_rows(int(n_new_examples), coords, token_ids)  # bad input fails before any write

        store = self._zgroup.store
        _drop_root_consolidated(store)  # never leave plain readers a consolidated copy with the old shapes
        if self.extending is None:
            self._zgroup.attrs.update({_EXTENDING: {"n_examples": target, "from": old}})
        for name, za in self._zgroup.arrays():
            if tuple(za.metadata.dimension_names or ())[:1] == ("example",) and za.shape[0] != target:
                za.resize((target, *za.shape[1:]))
        for name, values in new.items():
            self._zgroup[name][old:target] = values
        self._extend_flags(-(-target // self.shard_size))
        # the last write: the new size and the provenance replace the note (one document write)
        current = _open_zgroup(self.url, self.group, self.storage_options, mode="r+")
        final = {k: v for k, v in dict(current.attrs).items() if k != _EXTENDING}
        final.update(prov)
        final.update({"n_examples": target, "n_shards": -(-target // self.shard_size)})
        current.attrs.put(_jsonable(final))
        self.__init__(self.url, self.group, _open_zgroup(self.url, self.group, self.storage_options, mode="r+"),
                      self.storage_options)

    def _extension_rows(self, n: int, coords: Mapping[str, np.ndarray], token_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The new examples' rows of every example-dim array but the activations, validated against the group."""
        where = f"store {self.url} group {self.group or '/'}"
        tok_arr = self._zgroup["token_ids"]
        width = int(tok_arr.shape[1])
        tok = np.asarray(token_ids)
        if tok.ndim == 2 and tok.shape[1] > width:
            raise ValueError(f"{where}: the new token_ids are {tok.shape[1]} wide, the group's tok dim is {width}")
        if tok.ndim == 2 and tok.dtype.kind in "iu" and tok.shape[1] < width:
            tok = np.concatenate([np.full((tok.shape[0], width - tok.shape[1]), -1, tok.dtype), tok], axis=1)
        layout = _Layout.build(n, self.shard_size, list(self.arrays), coords, tok)
        stored = {name for name, za in self._zgroup.arrays()
                  if tuple(za.metadata.dimension_names or ()) == ("example",) and name != "example"}
        given = set(layout.coords)
        if given != stored:
            raise ValueError(f"{where}: coords of the new examples {sorted(given)} differ from the group's {sorted(stored)}")
        rows: dict[str, np.ndarray] = {"example": np.arange(self.n_examples, self.n_examples + n, dtype=np.int64),
                                       "token_ids": layout.token_ids}
        for name, values in layout.coords.items():
            za = self._zgroup[name]
            if values.dtype == object:
                if za.dtype.kind not in "OTU":
                    raise ValueError(f"{where}: coord {name!r} is {za.dtype} in the group, strings were given")
            elif not np.can_cast(values.dtype, za.dtype, casting="same_kind"):
                raise ValueError(f"{where}: coord {name!r} is {za.dtype} in the group, {values.dtype} was given")
            else:
                values = values.astype(za.dtype)
            rows[name] = values
        return rows

    def _extend_flags(self, n_shards: int) -> None:
        """Done flags for the new shards, all down: the flags array grows, and flag objects from a past life
        of those indices (none, normally) are removed."""
        from zarr.core.sync import sync

        if self._done.shape[0] != n_shards:
            self._done.resize((n_shards,))
        keys, _ = self._listing()
        sep = getattr(self._done.metadata.chunk_key_encoding, "separator", "/")
        head = f"{_PROGRESS}/{_DONE}/c{sep}"
        prefix = f"{self.group}/" if self.group else ""
        stale = [k for k in keys if k.startswith(head) and k[len(head):].isdigit() and int(k[len(head):]) >= self.n_shards]
        for k in stale:
            sync(self._zgroup.store.delete(prefix + k))

    # ------------------------------------------------------------------ sizes

    def estimate_nbytes(self) -> int:
        """Uncompressed bytes of the activations and token ids of this group (an upper bound on disk use
        for those; the text coords come on top)."""
        tok = self._zgroup["token_ids"]
        return self.estimate_nbytes_for(self.n_examples, self.arrays) + int(np.prod(tok.shape)) * 4

    @staticmethod
    def estimate_nbytes_for(n_examples: int, arrays: Iterable[ArraySpec]) -> int:
        """Uncompressed bytes of the captured activations, to check disk room before creating a group."""
        return sum(spec.nbytes(n_examples) for spec in arrays)

    def info(self) -> GroupInfo:
        """This group's :class:`GroupInfo`."""
        arrays = [
            ArrayInfo(
                name=s.name,
                dims=s.dims,
                shape=tuple(self._zarrays[s.name].shape),
                dtype=s.dtype,
                chunks=tuple(self._zarrays[s.name].chunks),
                shards=tuple(self._zarrays[s.name].shards) if self._zarrays[s.name].shards else None,
            )
            for s in self.arrays
        ]
        rep = self.check()
        damaged = rep.damaged_shards
        complete = [i for i in rep.done if i not in set(damaged)]
        return GroupInfo(
            group=self.group,
            arrays=arrays,
            provenance=dict(self.provenance),
            fraction_done=len(complete) / self.n_shards,
            n_examples=self.n_examples,
            shard_size=self.shard_size,
            n_shards=self.n_shards,
            done_shards=complete,
            damaged_shards=damaged,
        )


# ---------------------------------------------------------------------------------------------
# reading


def open_store(url: str | Path, group: str | None = None, storage_options: dict | None = None):
    """Open an activation group as a lazy, dask-backed ``xarray.Dataset``.

    ``group=None``: the root if it holds arrays, else the single activation group below it, else a
    ValueError listing the groups. Unwritten shards read as NaN (``ActivationStore.open(...).missing_shards()``
    lists them). A finished shard with a missing chunk is refused here, from one listing of the group,
    with :class:`StoreCorruptError`; a chunk whose bytes fail their checksum raises it when it is read.
    """
    import xarray as xr

    url = _norm_url(url)
    group = resolve_group(url, group, storage_options)
    from mechdiff.engine.integrity import CheckedStore

    st = ActivationStore.open(url, group, storage_options, read_only=True)
    rep = st.check()
    if not rep.ok:
        raise StoreCorruptError(f"{rep.problems[0].line(url, group)} ({len(rep.problems)} damaged chunk(s) in all); {repair_hint(url, group, rep)}")
    store = CheckedStore(_make_store(url, storage_options, read_only=True), url, group, st._grids(), rep.done,
                         repair_hint(url, group, rep))
    # consolidated=False: mechdiff's readers always see the current hierarchy, never a stale copy.
    try:
        ds = xr.open_zarr(store, group=group or None, consolidated=False, zarr_format=3)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an array's zarr.json that does not parse
        raise StoreCorruptError(f"store {url} group {group or '/'} cannot be read: {_first_line(e)}") from None
    for spec in st.arrays:
        if spec.dtype == "bfloat16":
            ds[spec.name] = _bf16_as_float32(ds[spec.name])
    from mechdiff.engine.capture import capture_of

    # The capture typed (records of older stores read as well), and where it came from, so analyses can name
    # it in messages and reopen it for progress.
    cap = capture_of(ds.attrs)
    if cap is not None:
        ds.attrs["capture"] = cap
    ds.attrs["store_url"] = url
    ds.attrs["group"] = group
    return ds


def _bf16_as_float32(var: Any) -> Any:
    """A bfloat16 data var (uint16 bit patterns) as float32, lazily: each dask block is widened on read."""
    attrs = {k: v for k, v in var.attrs.items() if k != "mechdiff_dtype"}
    out = var.copy(data=var.data.map_blocks(bf16_bits_to_float32, dtype=np.float32))
    out.attrs = {**attrs, "stored_dtype": "bfloat16"}
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they stand for, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Float values rounded to bfloat16 (to nearest, ties to even, as torch does), as uint16 bit patterns.
    A NaN keeps its sign and upper payload bits (quiet bit set), so widened bf16 NaNs keep their exact bits."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def consolidate(url: str | Path, storage_options: dict | None = None) -> None:
    """Write the store root's consolidated metadata (every group and array below it) in one document.
    Call once when a run completes (:meth:`ActivationStore.finish` does); nothing in the write path needs it."""
    _consolidate_root(_make_store(_norm_url(url), storage_options))


def repair_hint(url: str, group: str, rep: IntegrityReport | None = None) -> str:
    """The fix for a damaged group, as one clause of an error message."""
    if rep is not None and rep.group_damaged:
        return "the group's coords are damaged: remove the group and extract it again"
    return (f"run `mechdiff store verify {url} --group {group or '/'} --repair`, then the same extraction again: "
            "it rewrites exactly the damaged shards")


def resolve_group(url: str | Path, group: str | None, storage_options: dict | None = None) -> str:
    """``group`` normalised; for None, the root if it holds arrays, else the single activation group below it,
    else a ValueError listing the groups."""
    if group is not None:
        return _norm_group(group)
    url = _norm_url(url)
    root = _open_zgroup(url, "", storage_options, mode="r")
    if _MARKER in root.attrs or any(True for _ in root.array_keys()):
        return ""
    groups = _walk(root)
    if len(groups) != 1:
        listed = ", ".join(groups) if groups else "none"
        raise ValueError(f"store {url} holds {len(groups)} activation groups ({listed}); pass group=")
    return groups[0]


def list_groups(url: str | Path, storage_options: dict | None = None) -> list[str]:
    """Paths of the activation groups in a store, sorted (their progress: :func:`store_info`)."""
    return _walk(_open_zgroup(_norm_url(url), "", storage_options, mode="r"))


def store_info(url: str | Path, storage_options: dict | None = None) -> list[GroupInfo]:
    """A :class:`GroupInfo` (arrays, provenance, fraction done) for every activation group in a store."""
    url = _norm_url(url)
    root = _open_zgroup(url, "", storage_options, mode="r")
    out = []
    for g in _walk(root):
        zg = root if g == "" else root[g]
        out.append(ActivationStore(url, g, zg, storage_options).info())
    return out


def _walk(root: Any) -> list[str]:
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, g = stack.pop()
        if _MARKER in g.attrs:
            found.append(path)
            continue  # an activation group's sub-groups are its own bookkeeping
        for name, child in g.groups():
            stack.append((f"{path}/{name}" if path else name, child))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# creation


@dataclass
class _Layout:
    """Everything needed to create a group, validated."""

    n_examples: int
    shard_size: int
    specs: list[ArraySpec]
    layers: tuple[int, ...]
    n_positions: int | None
    coords: dict[str, np.ndarray]
    token_ids: np.ndarray

    @property
    def n_shards(self) -> int:
        return -(-self.n_examples // self.shard_size)

    @classmethod
    def build(
        cls,
        n_examples: int,
        shard_size: int,
        specs: list[ArraySpec],
        coords: Mapping[str, np.ndarray],
        token_ids: np.ndarray,
    ) -> _Layout:
        if n_examples < 1 or shard_size < 1:
            raise ValueError(f"n_examples ({n_examples}) and shard_size ({shard_size}) must be >= 1")
        if not specs:
            raise ValueError("no arrays to store")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"array names repeat: {names}")
        widths: dict[str, int] = {}
        for s in specs:
            if widths.setdefault(s.dim, s.width) != s.width:
                raise ValueError(f"arrays along dim {s.dim!r} disagree on its size ({widths[s.dim]} vs {s.width} for {s.name})")
        layers = tuple(sorted(set().union(*(s.layers for s in specs))))
        pos = [s.n_positions for s in specs if s.n_positions is not None]
        n_positions = max(pos) if pos else None

        tok = np.asarray(token_ids)
        if tok.ndim != 2 or tok.shape[0] != n_examples or tok.shape[1] < 1 or tok.dtype.kind not in "iu":
            raise ValueError(f"token_ids must be an int array of shape ({n_examples}, T>=1), got {tok.dtype} {tok.shape}")
        tok = tok.astype(np.int32)
        real = tok >= 0
        if (tok < -1).any() or not (real[:, 1:] >= real[:, :-1]).all():
            raise ValueError("token_ids must be right-aligned with -1 padding on the left")

        out: dict[str, np.ndarray] = {}
        for name, values in coords.items():
            if name in _RESERVED_NAMES or name in names:
                raise ValueError(f"coord name {name!r} clashes with a dim, token_ids or an array name")
            arr = np.asarray(values)
            if arr.shape != (n_examples,):
                raise ValueError(f"coord {name!r} has shape {arr.shape}, expected ({n_examples},)")
            if arr.dtype.kind in "USTO":
                # zarr v3's variable-length "string" dtype is stable; fixed-width unicode is not
                arr = np.array([str(v) for v in arr.tolist()], dtype=object)
            out[name] = arr
        if "n_tokens" not in out:
            out["n_tokens"] = real.sum(axis=1).astype(np.int32)
        return cls(n_examples, shard_size, specs, layers, n_positions, out, tok)


def _create(url: str, group: str, layout: _Layout, provenance: dict[str, Any], storage_options: dict | None,
            *, sharded: bool = True) -> None:
    """Make the group with zarr alone, in the layout ``xarray.to_zarr`` gives a Dataset of these coords and
    (uncomputed) data vars, so plain ``xarray.open_zarr`` reads it; importing xarray, dask and pandas for it
    cost a cold ``mechdiff extract`` ~0.7 s and ~90 MiB."""
    n = layout.n_examples
    P = layout.n_positions
    T = layout.token_ids.shape[1]
    # name -> (dims, values, chunks or None for zarr's own choice, as xarray leaves numpy coords to zarr)
    coords: dict[str, tuple[tuple[str, ...], np.ndarray, tuple[int, ...] | None]] = {
        "example": (("example",), np.arange(n, dtype=np.int64), None),
        "layer": (("layer",), np.asarray(layout.layers, dtype=np.int64), None),
        "tok": (("tok",), np.arange(-T, 0, dtype=np.int64), None),
        "token_ids": (("example", "tok"), layout.token_ids,
                      _chunk_shape((n, T), layout.shard_size, 4, has_position=False, layer_dim=False)),
    }
    if P is not None:
        coords["position"] = (("position",), np.arange(-P, 0, dtype=np.int64), None)
    for name, arr in layout.coords.items():
        coords[name] = (("example",), arr, None)
    # xarray's "coordinates" attrs: on each data var the non-dimension coords along its dims, on the group the rest
    extra = {name: set(dims) for name, (dims, _, _) in coords.items() if (name,) != dims}
    on_var = {s.name: sorted(c for c, d in extra.items() if d <= set(s.dims)) for s in layout.specs}
    on_group = sorted(c for c in extra if not any(c in v for v in on_var.values()))

    bf16 = any(s.dtype == "bfloat16" for s in layout.specs)
    marker = {
        # format 2 readers would misread bf16 bits, so only a plain unsharded layout keeps that number
        "format": FORMAT_VERSION if (sharded or bf16) else 2,
        "arrays": [s.to_json() for s in layout.specs],
        "layers": list(layout.layers),
        "n_positions": P,
    }
    attrs = {
        **provenance,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_examples": n,
        "shard_size": layout.shard_size,
        "n_shards": layout.n_shards,
        _PENDING: {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()},
    }
    import zarr
    from zarr.errors import ContainsArrayError, ContainsGroupError

    store = _make_store(url, storage_options)
    # a consolidated root copy would hide this group from plain open_zarr until the run's finish()
    _drop_root_consolidated(store)
    # The group's own zarr.json comes first and says "being created": a kill at any later point leaves a
    # group that the next create_or_open recognises as interrupted and makes again.
    try:
        zg = zarr.open_group(store, path=group, mode="w-", zarr_format=3, attributes=_jsonable(attrs), use_consolidated=False)
    except (ContainsGroupError, ContainsArrayError):
        raise FileExistsError(f"store {url} group {group or '/'} exists") from None
    # write_empty_chunks: a coord chunk equal to the fill value (a label column of zeros) is still written,
    # so that every coord chunk can be proven present.
    for name, (dims, values, chunks) in coords.items():
        shards = None
        if sharded and name == "token_ids":
            # written once, here, by one process: its shard objects may span many work shards
            assert chunks is not None
            rows = chunks[0] * max(1, MAX_SHARD_BYTES // (chunks[0] * T * 4))
            shards = (min(rows, -(-n // chunks[0]) * chunks[0]), T)
        za = _new_array(zg, name, dims, values.shape, values.dtype, chunks, _compressors("zstd", crc=True), {},
                        shards=shards)
        za[...] = values
    for s in layout.specs:
        shape = (n, len(layout.layers), *((P,) if s.n_positions is not None else ()), s.width)
        itemsize = s.storage_dtype.itemsize
        chunks = _chunk_shape(shape, layout.shard_size, itemsize, has_position=s.n_positions is not None)
        shards = _shard_shape(shape, chunks, layout.shard_size, itemsize) if sharded else None
        var_attrs: dict[str, Any] = {"site": s.site, "captured_layers": list(s.layers), "n_positions": s.n_positions}
        if on_var[s.name]:
            var_attrs["coordinates"] = " ".join(on_var[s.name])
        fill = None
        if s.dtype == "bfloat16":
            var_attrs["mechdiff_dtype"] = "bfloat16"  # uint16 bit patterns; open_store widens them to float32
            fill = _BF16_NAN  # unwritten reads as NaN, as for the float dtypes
        _new_array(zg, s.name, s.dims, shape, s.storage_dtype, chunks, _compressors(s.compression, crc=True), var_attrs,
                   shards=shards, fill=fill)
    if on_group:
        zg.attrs.update({"coordinates": " ".join(on_group)})

    progress = zg.create_group(_PROGRESS)
    # Chunk size 1: each shard's flag is its own object, so concurrent writers never share one.
    progress.create_array(
        _DONE,
        shape=(layout.n_shards,),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        compressors=None,
        dimension_names=("shard",),
        chunk_key_encoding=_FLAT_KEYS,
    )
    # The last write of the creation: the marker replaces the pending note (one atomic document write).
    final = {k: v for k, v in dict(zg.attrs).items() if k != _PENDING}
    final[_MARKER] = marker
    zg.attrs.put(final)


# xarray's encoding of a NaN fill value in the _FillValue attribute: the float64's bytes, base64
_NAN_FILL_ATTR = "AAAAAAAA+H8="


def _new_array(zg: Any, name: str, dims: tuple[str, ...], shape: tuple[int, ...], dtype: np.dtype,
               chunks: tuple[int, ...] | None, compressors: list[Any] | None, attrs: dict[str, Any],
               *, shards: tuple[int, ...] | None = None, fill: Any = None) -> Any:
    """One array as xarray's zarr backend creates it: floats filled with NaN (and say so in ``_FillValue``),
    strings as zarr's variable-length string, other dtypes with zarr's default fill (or ``fill``).
    ``shards``: the shard objects' shape (``chunks`` are then the inner chunks)."""
    if dtype.kind == "f":
        fill, attrs = np.nan, {**attrs, "_FillValue": _NAN_FILL_ATTR}
    kw = {} if chunks is None else {"chunks": chunks}
    common = dict(shape=shape, dtype=str if dtype.kind in "OUS" else dtype, fill_value=fill, compressors=compressors,
                  chunk_key_encoding=_FLAT_KEYS, dimension_names=dims, attributes=attrs,
                  config={"write_empty_chunks": True}, **kw)
    if shards is not None:
        # the compressors (and the crc32c) apply to each inner chunk; the shard index has its own crc32c
        return zg.create_array(name, shards=shards, **common)
    return zg.create(name, **common)


def _interrupted(pending: Any) -> bool:
    """Whether a pending creation note belongs to a creation that is gone (killed), not one still running."""
    if not isinstance(pending, Mapping):
        return False  # no note: not a group this code was creating
    if pending.get("host") == socket.gethostname():
        pid = int(pending.get("pid", -1))
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # another machine: a creation takes seconds, so one pending for minutes was killed
    return time.time() - float(pending.get("started", 0)) > 600


def _delete_group(url: str, group: str, storage_options: dict | None) -> None:
    from zarr.core.sync import sync

    sync(_make_store(url, storage_options).delete_dir(group))


def _member(zgroup: Any, name: str, url: str, group: str) -> Any:
    """An array of the group, with a message naming it when it is absent or its metadata does not parse."""
    try:
        return zgroup[name]
    except KeyError:
        raise StoreIncompleteError(
            f"store {url} group {group or '/'} is incomplete ({name} missing): its creation was interrupted; "
            "remove the group and create it again"
        ) from None
    except (ValueError, TypeError) as e:
        path = f"{group}/{name}" if group else name
        raise StoreCorruptError(
            f"store {url}: the metadata of {path} ({path}/zarr.json) is unreadable ({_first_line(e)}); "
            "remove the group and extract it again"
        ) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _drop_root_consolidated(store: Any) -> None:
    """Remove the root's consolidated metadata, if any (one small read, and a write only when there is one):
    a copy that lacks a new group, or holds an array's old shape, would mislead plain ``open_zarr``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def run() -> None:
        proto = default_buffer_prototype()
        buf = await store.get("zarr.json", proto)
        if buf is None:
            return
        doc = json.loads(buf.to_bytes())
        if not doc.get("consolidated_metadata"):
            return
        doc.pop("consolidated_metadata")
        await store.set("zarr.json", proto.buffer.from_bytes(json.dumps(doc, indent=2).encode()))

    sync(run())


def _consolidate_root(store: Any) -> None:
    """Refresh the root's consolidated metadata (what plain ``open_zarr`` reads first)."""
    import zarr

    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) in the v3 spec; we know.
        warnings.simplefilter("ignore")
        try:
            zarr.consolidate_metadata(store, zarr_format=3)
        except TypeError:
            pass  # a store without consolidated-metadata support: open_zarr falls back by itself


def _chunk_shape(
    shape: tuple[int, ...], shard_size: int, itemsize: int, *, has_position: bool, layer_dim: bool = True
) -> tuple[int, ...]:
    """Chunks: layer 1, example = shard size (or its largest divisor keeping a chunk <= 16 MiB),
    position reduced only when a single example's row is over the limit."""
    n = shape[0]
    rest = list(shape[1:])
    if layer_dim:
        rest[0] = 1
    row = int(np.prod(rest, dtype=np.int64)) * itemsize  # bytes per example in one chunk
    s = min(shard_size, n)
    if s * row <= MAX_CHUNK_BYTES:
        return (s, *rest)
    if row <= MAX_CHUNK_BYTES:
        # A divisor of the shard size, so that no chunk straddles two shards.
        d = max(1, min(s, MAX_CHUNK_BYTES // row))
        while s % d:
            d -= 1
        return (d, *rest)
    if has_position:
        p_total, width = rest[-2], rest[-1]
        per_pos = max(1, MAX_CHUNK_BYTES // (width * itemsize))
        n_pchunks = -(-p_total // per_pos)
        rest[-2] = -(-p_total // n_pchunks)  # even split of the positions
    return (1, *rest)


def _shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...], shard_size: int, itemsize: int) -> tuple[int, ...]:
    """Shard objects of whole inner chunks: every position and the full width; along examples a divisor of the
    work shard (a multiple of the inner chunk, which divides it too), so that no object straddles two work
    shards; then as many layers as fit in MAX_SHARD_BYTES, split evenly. The whole work shard is taken along
    examples first: it is what one write fills, and fewer, bigger objects per write."""
    n, n_layers = shape[0], shape[1]
    ce = chunks[0]
    rest = [-(-d // c) * c for d, c in zip(shape[2:], chunks[2:])]  # whole inner chunks, rounded up
    row = int(np.prod(rest, dtype=np.int64)) * itemsize  # bytes of one example at one layer
    s = min(shard_size, n)
    fits = [m * ce for m in range(s // ce, 0, -1) if s % (m * ce) == 0 and m * ce * row <= MAX_SHARD_BYTES]
    e = fits[0] if fits else ce
    per_layer = e * row
    lmax = max(1, min(n_layers, MAX_SHARD_BYTES // per_layer))
    n_lshards = -(-n_layers // lmax)
    return (e, -(-n_layers // n_lshards), *rest)


def _dtype_name(dtype: Any) -> str:
    name = str(dtype)
    if name in ("bfloat16", "bf16", "torch.bfloat16"):
        return "bfloat16"
    try:
        return str(np.dtype(dtype))
    except TypeError:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}") from None


def cast_to_spec(spec: ArraySpec, values: np.ndarray, examples: Sequence[int]) -> np.ndarray:
    """``values`` (``[row, layer, ...]``, any float dtype) in ``spec``'s stored dtype, itself when it already is.

    Raises OverflowError, naming the array, the example (``examples[row]``) and the layer, where a finite value
    would become inf (inf and nan already there are kept). Extraction casts each batch as it arrives, so a
    shard is held in the stored dtype, never as a float32 copy. A bfloat16 spec returns uint16 bit patterns
    (``spec.storage_dtype``): float32 values that are bfloat16 values (``tensor.float()``) keep their bits."""
    if spec.dtype == "bfloat16":
        if values.dtype == _BF16_BITS:
            return values  # cast on the model's device already (forward_capture(stored=True))
        out = float32_to_bf16_bits(values)
        # bfloat16 has float32's range: only values within half a bf16 step of float32's max overflow
        if _has_inf(out):
            bad = ((out & 0x7FFF) == 0x7F80) & np.isfinite(values)
            if bad.any():
                idx = tuple(int(x) for x in np.argwhere(bad)[0])
                raise OverflowError(
                    f"array {spec.name}: value {values[idx]!r} at example {examples[idx[0]]} "
                    f"(layer {spec.layers[idx[1]]}) overflows bfloat16; store this array as float32"
                )
        return out
    target = np.dtype(spec.dtype)
    if values.dtype == target:
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(target)
    # Cheap test first (no inf at all is the normal case), the exact mask only when needed.
    if target.itemsize < values.dtype.itemsize and _has_inf(out):
        bad = np.isinf(out) & np.isfinite(values)
        if bad.any():
            idx = tuple(int(x) for x in np.argwhere(bad)[0])
            raise OverflowError(
                f"array {spec.name}: value {values[idx]!r} at example {examples[idx[0]]} "
                f"(layer {spec.layers[idx[1]]}) overflows {target}; store this array as float32"
            )
    return out


def _has_inf(x: np.ndarray) -> bool:
    if x.dtype == _BF16_BITS:  # bfloat16 bit patterns
        return bool(((x & 0x7FFF) == 0x7F80).any())
    if x.dtype == np.float16:
        # exponent all ones and mantissa zero, on the raw bits: ~3x faster than np.isinf on float16
        return bool(((x.view(np.uint16) & 0x7FFF) == 0x7C00).any())
    return bool(np.isinf(x).any())


def _compressors(compression: str | None, crc: bool = False) -> list[Any] | None:
    """The bytes-to-bytes codecs: the compression, then (``crc``) a crc32c of the stored bytes, so that a
    flipped or truncated chunk fails when it is read instead of decoding to wrong numbers."""
    tail: list[Any] = []
    if crc:
        from zarr.codecs import Crc32cCodec

        tail = [Crc32cCodec()]
    if compression is None:
        return tail or None
    if compression == "zstd" or compression.startswith("zstd:"):
        from zarr.codecs import ZstdCodec

        level = 3
        if compression.startswith("zstd:"):
            try:
                level = int(compression.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad compression {compression!r}; use 'zstd', 'zstd:<level>' or None") from None
        return [ZstdCodec(level=level), *tail]
    raise ValueError(f"bad compression {compression!r}; use 'zstd', 'zstd:<level>' or None")


# ---------------------------------------------------------------------------------------------
# helpers


def _norm_url(url: str | Path) -> str:
    return str(url) if "://" in str(url) else str(Path(url))


def _norm_group(group: str | None) -> str:
    return (group or "").strip("/")


def _make_store(url: str, storage_options: dict | None, read_only: bool = False) -> Any:
    """A zarr store for a local path or an fsspec URL (s3://, gs://, memory://, ...)."""
    from zarr.storage import FsspecStore, LocalStore

    if "://" in url:
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    if storage_options:
        raise ValueError(f"storage_options given for the local path {url}")
    if read_only and not Path(url).exists():
        raise FileNotFoundError(f"no zarr store at {url}")
    return LocalStore(url, read_only=read_only)


def _open_zgroup(url: str, group: str, storage_options: dict | None, *, mode: str, missing_ok: bool = False) -> Any:
    import zarr

    try:
        store = _make_store(url, storage_options, read_only=(mode == "r"))
        # use_consolidated=False: the root's consolidated copy may lag behind concurrent creators.
        return zarr.open_group(store, path=group, mode=mode, zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, KeyError) as e:
        if missing_ok:
            return None
        raise FileNotFoundError(f"no zarr group {group or '/'} in store {url}") from e
    except (ValueError, TypeError) as e:
        # e.g. a path that holds an array, a zarr v2 store, or a zarr.json that does not parse
        where = f"{group}/zarr.json" if group else "zarr.json"
        raise StoreCorruptError(
            f"store {url} group {group or '/'} cannot be opened as a zarr v3 group ({where}: {_first_line(e)})"
        ) from None


def _jsonable(obj: Any) -> Any:
    """Make provenance JSON-safe: numpy scalars/arrays, tuples, sets and Paths become plain JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _short(v: Any, limit: int = 80) -> str:
    """A value for a one-line message: strings quoted, others as compact JSON, long ones cut."""
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
    s = " ".join(s.split())
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return repr(s) if isinstance(v, str) else s


def differing_fields(
    stored: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None
) -> list[tuple[str, Any, Any]]:
    """``(field, stored value, new value)`` for each field of two JSON objects (capture specs) that differs,
    sorted; ``keys`` limits the comparison to those fields. Every message that compares specs names these."""
    fields = sorted(set(stored) | set(new)) if keys is None else sorted(keys)
    return [(f, stored.get(f), new.get(f)) for f in fields if stored.get(f) != new.get(f)]


def _field_diff(key: str, old: Any, new: Any) -> str:
    """``key differs: ...`` naming the fields that differ when both values are JSON objects (a capture
    spec), so that two long specs never look alike in a message cut to a line."""
    try:
        a, b = (x if isinstance(x, Mapping) else json.loads(x) for x in (old, new))
    except (TypeError, ValueError):
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = differing_fields(a, b)
        shown = "; ".join(f"{f} stored {_short(x)}, this run {_short(y)}" for f, x, y in diffs)
        return f"{key} differs in {', '.join(f for f, _, _ in diffs)}: {shown}"
    return f"{key} differs: stored {_short(old)}, this run {_short(new)}"


def _weights(h: Any) -> str:
    if not h:
        return ""
    h = str(h)
    return f" (weights {h[:12]}{'..' if len(h) > 12 else ''})"


def _spec_str(s: ArraySpec | None) -> str:
    if s is None:
        return "(absent)"
    return (
        f"{s.site} layers {list(s.layers)} positions {s.n_positions} {s.dim} {s.width} {s.dtype} {s.compression}"
    )
