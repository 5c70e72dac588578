"""The store group an extraction writes: made, or opened and checked against the run, grown for a dataset
that grew at its end, and the shards left to write. The HF and the vLLM extraction backends share it, so a
group begun on one resumes on the other under the same checks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mechdiff.engine.capture import ResolvedCapture, capture_of, describe_differences
from mechdiff.engine.data import PromptSet
from mechdiff.engine.store import ActivationStore, StoreIncompleteError, StoreMismatchError

if TYPE_CHECKING:
    from mechdiff.engine.extract import PreparedExtraction

__all__ = ["open_group", "check_room", "check_capture", "existing_group", "grow", "identity_keys"]


def open_group(prep: "PreparedExtraction", prompts: PromptSet, out: str, group: str, *, shard_size: int,
               storage_options: dict | None = None, append: bool = False,
               shards: Sequence[int] | None = None) -> tuple[ActivationStore, list[int], int]:
    """The group ``group`` of the store at ``out`` for ``prep``: made, or opened and checked (model, tokenizer,
    dataset, capture spec, room on disk for what is left), grown first where ``append`` and the dataset grew.
    Returns the store, the shards left to write (of ``shards``, default all) and how many of those were done.
    Raises before anything is written."""
    existing = existing_group(out, group, storage_options)
    # room for what is left to write: the whole group when it is new, else only its missing shards
    left = len(prompts) if existing is None else sum(len(existing[0].shard_range(i)) for i in existing[1])
    if existing is not None and append:
        left += max(0, len(prompts) - existing[0].n_examples)  # the examples it grows by
    check_room(out, ActivationStore.estimate_nbytes_for(left, prep.arrays))
    if existing is not None:
        check_capture(existing[0], prep.provenance["capture"])
        if existing[0].extending is not None and not append:
            raise StoreIncompleteError(f"store {out} group {group} was being grown to {existing[0].extending} examples "
                                       "when it was interrupted: run the same extraction with append (--append)")
        st0 = existing[0]
        if not append and st0.n_examples < len(prompts) and st0.provenance.get("dataset_hash") != prompts.hash:
            raise StoreMismatchError(
                f"store {out} group {group} holds {st0.n_examples} examples of another dataset and {prompts.source} "
                f"has {len(prompts)}: if the dataset grew at its end, extract with append (--append) to add the new "
                "examples; else use another group")
        if append and (existing[0].n_examples < len(prompts) or existing[0].extending is not None):
            grow(ActivationStore.open(out, group, storage_options), prep, prompts, shard_size)  # writable
            existing = existing_group(out, group, storage_options)
    store = ActivationStore.create_or_open(
        out, group, n_examples=len(prompts), shard_size=shard_size, arrays=prep.arrays, coords=prep.coords,
        token_ids=prep.token_id_matrix(), provenance=prep.provenance, identity_keys=identity_keys(prep.provenance),
        storage_options=storage_options,
    )
    # shards not flagged done, and flagged ones with a chunk missing: from the listing above when the group
    # existed (nothing has written to it since), else from the group just made
    missing = set(existing[1] if existing is not None else store.missing_shards())
    asked = list(shards) if shards is not None else list(range(store.n_shards))
    todo = [s for s in asked if s in missing]
    return store, todo, len(asked) - len(todo)


def check_room(url: str, nbytes: int) -> None:
    """Refuse an output that is not a writable directory, or whose disk has less than ``nbytes`` free (object
    stores report no free space: not checked)."""
    if "://" in url and not url.startswith("file://"):
        return  # object stores report no free space; nothing to check
    path = Path(url.removeprefix("file://")).resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"output {url}: {probe} is not a directory")
    import tempfile

    # A real write, not os.access: as root, access() says yes on a read-only mount.
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".mechdiff-probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"output {url}: {probe} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise OSError(
            f"output {url} needs up to {nbytes / 1e9:.2f} GB (uncompressed estimate) but {probe} has "
            f"{free / 1e9:.2f} GB free"
        )


def existing_group(url: str, group: str, storage_options: dict | None) -> tuple[ActivationStore, list[int]] | None:
    """An existing group and its shards left to write (one listing), or None for a group still to be made
    (absent, or a creation that was interrupted: ``create_or_open`` makes it again). A group whose growth was
    interrupted lists no shards: only finishing the growth (``append``) can tell."""
    try:
        st = ActivationStore.open(url, group, storage_options, read_only=True)
    except (FileNotFoundError, StoreIncompleteError):
        return None
    return st, ([] if st.extending is not None else st.missing_shards())


def check_capture(st: ActivationStore, capture: dict) -> None:
    """Refuse to append to a group made with another capture spec, naming every differing field."""
    try:
        stored = capture_of(st.provenance)
    except ValueError as e:
        raise StoreMismatchError(f"store {st.url} group {st.group or '/'} has an unreadable capture record ({e})") from None
    want = ResolvedCapture.from_json(capture)
    diffs = stored.differences(want) if stored is not None else None
    if diffs is None or diffs:
        what = describe_differences(diffs) if diffs else "the store records no capture spec (an older format)"
        raise StoreMismatchError(f"store {st.url} group {st.group or '/'} was made with another capture spec: {what}; "
                                 "use another group or remove this one")


def grow(st: ActivationStore, prep: PreparedExtraction, prompts: PromptSet, shard_size: int) -> None:
    """Grow ``st`` to every prompt of ``prep``: the same model, tokenizer, capture and arrays, and its stored
    examples the first rows of the dataset (by their token ids); refused, naming why, before anything is written."""
    where = f"store {st.url} group {st.group or '/'}"
    old, n = st.n_examples, len(prompts)
    if n < old:
        raise StoreMismatchError(f"{where} holds {old} examples and the dataset {prompts.source} has {n}: an append "
                                 "only adds examples at the end")
    keys = [k for k in identity_keys(prep.provenance) if k != "dataset_hash"]
    st.check_same(prep.provenance, keys, old, shard_size, prep.arrays)  # model, tokenizer, capture, array shapes
    stored = np.asarray(st.token_ids(range(old)))
    for i, row in enumerate(stored):
        if [int(t) for t in row if t >= 0] != prep.token_ids[i]:
            raise StoreMismatchError(f"{where}: example {i} of the dataset {prompts.source} is not the stored example "
                                     f"{i}: an append needs the stored examples to be the dataset's first rows")
    width = stored.shape[1]
    new_ids = prep.token_ids[old:]
    if new_ids and max(len(x) for x in new_ids) > width:
        raise StoreMismatchError(f"{where} keeps token ids {width} wide and a new example has "
                                 f"{max(len(x) for x in new_ids)} tokens: extract the grown dataset into a new group")
    tok = np.full((n - old, width), -1, dtype=np.int32)
    for j, ids in enumerate(new_ids):
        if ids:
            tok[j, width - len(ids):] = ids
    coords = {k: v[old:] for k, v in prep.coords.items()}
    st.extend(n - old, coords, tok, provenance={"dataset": prompts.source, "dataset_hash": prompts.hash})


def identity_keys(provenance: dict) -> tuple[str, ...]:
    """What must match for a run to append to a store. Local weights are known by their content hash, so
    a moved or relative model path still matches; hub models also by their id."""
    keys = ("weights_hash", "tokenizer_hash", "dataset_hash", "capture")
    if str(provenance.get("weights_hash") or "").startswith("sha256:"):
        return keys
    return ("model_id", *keys)
