"""Truthfulness: is there a linear truth direction, and do base and post-trained models share it?

Following Marks & Tegmark ("The Geometry of Truth") as used by Du et al. (COLM 2025, section 4):

* activations of true / false statements at the statement's final tokens (the token before the period and
  the period: store positions ``last:2``), ``resid_post`` at every layer, read from the store;
* per model and layer the difference-of-means direction (true minus false), fitted on the ``train`` split of
  every topic but a held-out one; a 1-D probe (projection + threshold) tested on the held-out topic. With no
  ``heldout_topics`` given every topic is held out in turn (leave one topic out) and accuracies are averaged;
* the best layer of each model is chosen by the probe's accuracy on validation rows (the ``test`` split of the
  training topics: held-out subjects), never hard-coded; or, as in the paper, one ``probe_layer`` is given for
  every model and topic;
* optionally (``center_by_topic``, the paper's centring) each topic's mean activation over all its statements is
  subtracted first, for directions, probes, transfer and cosines alike;
* across models: cosine of the directions per layer, and probe transfer (model A's direction on model B's
  activations, with A's threshold as it is and refitted on B's training rows);
* intervention on few-shot prompts ending in "This statement is:": the direction, scaled by the mean
  difference times ``coef``, is added at the statement's final tokens of false statements and subtracted from
  true ones over a layer range; effect on P(TRUE) - P(FALSE) and the normalised intervention effect NIE
  (1 = each statement moved all the way to the other label's mean, 0 = no change), own vs transferred direction;
* a PCA figure of every model's statements at the probe layer with its truth direction (the paper's Figure 1b).

Everything that needs only activations is a dask reduction over the stores; only the intervention runs the
models (through the engine's ``Add`` intervention + ``hooks``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from mechdiff.analyses.common import Finding, ModelGroup, StoreRequirementError, StudyResult, require
from mechdiff.analyses.prompts import LABEL_WORDS, TRUTH_SUFFIX
from mechdiff.analyses.study import CaptureRequirement, StudyContext, StudyDef
from mechdiff.engine.capture import capture_of
from mechdiff.engine.tokens import answer_token, char_offsets
from mechdiff.errors import MechdiffError
from mechdiff.analyses.directions import (
    accuracy_interval,
    best_threshold,
    cosine_by_layer,
    cosine_matrix,
    direction_controls,
    mean_diff_sums,
)

__all__ = [
    "STUDY",
    "TruthSettings",
    "TruthSettingsError",
    "TruthData",
    "load_statements",
    "check_truth_store",
    "probe_analysis",
    "truth_prompts",
    "statement_end_positions",
    "truth_logits",
    "truth_margins",
    "intervention_analysis",
    "direction_controls",
    "accuracy_interval",
    "truth_verdict",
    "truthfulness_study",
    "run_truthfulness",
]

STUDY = "truthfulness"
POSITIONS = "last:2"
#: Probe scores held at once while fitting thresholds: a block of layers of [example, source, fold] float64 (always
#: at least one layer), instead of every layer's scores together.
PROJECTION_BLOCK_BYTES = 64 * 2**20
#: The PCA figure plots at most this many statements (a seeded sample when there are more): the SVD needs its rows
#: in memory, [rows, width] float64 per model.
PCA_MAX_ROWS = 2000
#: Probe positions tried when none is given, the period first (it wins ties).
PROBE_POSITIONS = (-1, -2)


class TruthSettingsError(MechdiffError, ValueError):
    """A truthfulness setting is out of range or does not fit the stores (e.g. a probe layer they lack)."""


@dataclass(frozen=True)
class TruthSettings:
    """Knobs of the truthfulness study (defaults follow the paper's protocol, except where said).

    Two protocol choices keep mechdiff's defaults, and each has the paper's version as an option:

    * ``probe_layer``: the paper (following Marks & Tegmark) probes every model and dataset at one fixed layer
      chosen once for the model family. Give it to do the same; the default None chooses each model's best layer
      on validation rows instead, because mechdiff runs model families whose truth layer nobody has measured yet
      and a layer must never be hard-coded for them. The cross-model cosine is compared at one layer either way
      (the pair's first model's).
    * ``center_by_topic``: the paper subtracts each dataset's mean activation (over all its statements, labels
      unused) before fitting directions and probes, so a dataset's offset cannot pass for truth nor shift a
      transferred probe's threshold. True does exactly that, per topic and per model, for the directions, the
      probes (fitting, validation, held-out test and transfer), the cosines and their controls and the PCA figure.
      The default False leaves activations as they are: centring a held-out topic uses that topic's own mean,
      which a probe applied to one new statement cannot know, so the uncentred held-out accuracy is the stricter
      test that a direction generalises.
    """

    site: str = "resid_post"
    probe_position: int | None = None  # -1: the period; -2: the token before it; None: chosen on validation
    probe_layer: int | None = None  # one layer for every model and topic (the paper's); None: each model's best on validation
    heldout_topics: tuple[str, ...] | None = None  # None: every topic in turn
    center_by_topic: bool = False  # subtract each topic's mean activation (all its statements) first: the paper's centring
    val_fraction: float = 0.25  # validation share of each topic when the data has no split column
    seed: int = 0
    # intervention
    intervene: bool = True
    iv_layers: tuple[int, ...] | None = None  # None: a window ending at the target model's best layer
    iv_window: int | None = None  # window length for the automatic range (default: a quarter of the layers)
    coef: float = 1.0
    direction_layer: str = "each"  # "each": layer l gets the layer-l direction; "best": the direction at the target model's best layer, at every layer
    transfer_scale: str = "target"  # a transferred direction is scaled by the target's mean difference ("source": its own)
    n_intervene: int = 100  # statements per held-out topic (balanced)
    n_shots: int = 4
    suffix: str = TRUTH_SUFFIX
    label_words: tuple[str, str] = LABEL_WORDS  # index = label
    token_budget: int = 8192
    # verdict thresholds: below these there is nothing to transfer, and the finding is inconclusive
    min_probe_acc: float = 0.6  # own probe accuracy on the held-out topic at the best layer
    min_gap: float = 0.05  # clean mean P(TRUE)-P(FALSE) of true minus false statements: NIE's denominator
    # controls computed in the same run, and the verdict rule against them (see truth_verdict)
    n_null: int = 20  # seeded label shuffles: null distribution of the cross-model cosine at the chosen layer
    null_quantile: float = 0.95  # the null's upper bound is this quantile of the shuffled-label cosines
    n_splits: int = 5  # seeded random split halves per model: the split-half reliability ceiling
    n_bootstrap: int = 200  # seeded bootstrap resamples of the examples (95% intervals on cosine and accuracy)
    chance_margin: float = 0.05  # a direction exists when held-out accuracy's interval lies above 0.5 + this
    ceiling_tolerance: float = 0.1  # agrees only when the cosine >= ceiling - this
    store_dtype: str = "float32"  # the dtype the study's capture is stored in

    def __post_init__(self) -> None:
        if self.store_dtype not in ("float16", "float32"):
            raise TruthSettingsError(f"store_dtype {self.store_dtype!r}: float16 or float32")
        if self.direction_layer not in ("each", "best"):
            raise TruthSettingsError(f"direction_layer {self.direction_layer!r}: each or best")
        if self.transfer_scale not in ("target", "source"):
            raise TruthSettingsError(f"transfer_scale {self.transfer_scale!r}: target or source")
        if self.probe_position not in (-1, -2, None):
            raise TruthSettingsError("probe_position must be -1 (the period), -2 (the token before it) or None (chosen "
                                     "on validation)")
        if self.probe_layer is not None and (isinstance(self.probe_layer, bool) or not isinstance(self.probe_layer, (int, np.integer))
                                             or self.probe_layer < 0):
            raise TruthSettingsError(f"probe_layer {self.probe_layer!r}: a layer index >= 0, or None (each model's best)")
        if not 0 < self.val_fraction < 1:
            raise TruthSettingsError("val_fraction must be in (0, 1)")
        if self.n_shots < 0 or self.n_intervene < 2:
            raise TruthSettingsError("n_shots must be >= 0 and n_intervene >= 2")
        if not math.isfinite(self.coef):
            raise TruthSettingsError("coef must be finite")
        if self.n_null < 1 or self.n_splits < 1 or self.n_bootstrap < 1:
            raise TruthSettingsError("n_null, n_splits and n_bootstrap must be >= 1")
        if not 0 < self.null_quantile < 1:
            raise TruthSettingsError("null_quantile must be in (0, 1)")


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class TruthData:
    """The statements (one row per store example), few-shot examples per topic, and each row's role."""

    texts: list[str]
    labels: np.ndarray  # int 0/1
    topics: np.ndarray  # str
    split: np.ndarray | None  # "train"/"test" or None
    shots: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    @property
    def topic_names(self) -> list[str]:
        return list(dict.fromkeys(self.topics.tolist()))

    def fit_mask(self, settings: TruthSettings) -> np.ndarray:
        """Rows directions and thresholds are fitted on: the train split (else a seeded share per topic)."""
        if self.split is not None:
            return self.split == "train"
        rng = np.random.default_rng(settings.seed)
        fit = np.ones(len(self.texts), dtype=bool)
        for t in self.topic_names:
            idx = np.flatnonzero(self.topics == t)
            k = max(1, int(round(settings.val_fraction * idx.size)))
            fit[rng.choice(idx, size=k, replace=False)] = False
        return fit


def load_statements(data: Any, *, shots: Mapping[str, Sequence[tuple[str, int]]] | str | Path | None = None):
    """Statements from a PromptSet, a CSV, a directory of ``truth_*.csv`` (plus ``shots.json`` if present) or a
    list of CSVs. Returns a :class:`mechdiff.engine.data.PromptSet` with ``label`` and ``topic`` columns (topic
    from the file name when a file has none) and the few-shot examples found (``{}`` if none)."""
    from mechdiff.engine.data import DataError, PromptSet, load_prompts

    shot_map: dict[str, list[tuple[str, int]]] = {}
    if isinstance(data, PromptSet):
        ps = data
    else:
        paths: list[Path] = []
        items = [data] if isinstance(data, (str, Path)) else list(data)
        for item in items:
            p = Path(item)
            if p.is_dir():
                found = sorted(p.glob("truth_*.csv"))
                if not found:
                    raise DataError(f"{p}: no truth_*.csv statement files in this directory")
                paths += found
                if shots is None and (p / "shots.json").exists():
                    shots = p / "shots.json"
            else:
                paths.append(p)
        if not paths:
            raise DataError("no statement files given")
        parts = []
        for p in paths:
            ps_i = load_prompts(p, text_column="statement" if _has_column(p, "statement") else None)
            if "label" not in ps_i.columns:
                raise DataError(f"{p}: no label column (true = 1, false = 0)")
            if "topic" not in ps_i.columns:
                stem = p.stem.removeprefix("truth_")
                ps_i.columns["topic"] = np.asarray([stem] * len(ps_i), dtype=object)
            parts.append(ps_i)
        common = set(parts[0].columns)
        for part in parts[1:]:
            common &= set(part.columns)
        texts = [t for part in parts for t in part.texts]
        cols = {}
        for c in sorted(common):
            vals = [np.asarray(part.columns[c]) for part in parts]
            kinds = {v.dtype.kind for v in vals}
            cols[c] = np.concatenate(vals) if len(kinds) == 1 and kinds <= set("iufb") else np.asarray(
                [str(x) for v in vals for x in v.tolist()], dtype=object
            )
        source = paths[0].parent.name + "/truth" if len(paths) > 1 else str(paths[0])
        ps = PromptSet(texts=texts, columns=cols, source=source, text_column="statement")
    if isinstance(shots, (str, Path)):
        raw = json.loads(Path(shots).read_text())
        shot_map = {str(t): [(str(s), int(l)) for s, l in v] for t, v in raw.items()}
    elif shots is not None:
        shot_map = {str(t): [(str(s), int(l)) for s, l in v] for t, v in shots.items()}
    return ps, shot_map


def _has_column(path: Path, name: str) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return name in [h.strip() for h in f.readline().strip().split(",")]
    except OSError:
        return False


def check_truth_store(ds: xr.Dataset, settings: TruthSettings = TruthSettings()) -> None:
    """Raise :class:`StoreRequirementError` naming what to extract when ``ds`` cannot serve the study."""
    require(ds, site=settings.site, study=STUDY, positions=None, min_positions=2, coords=("label", "topic"))
    where = ds.attrs.get("group") or ds.attrs.get("dataset") or "store"
    hint = f"extract the statements with --sites {settings.site} --positions {POSITIONS} --template none"
    if "position" not in ds[settings.site].dims:
        raise StoreRequirementError(f"{STUDY}: {where} keeps no position dim; {hint}")
    pos = set(int(p) for p in ds["position"].values)
    if not {-1, -2} <= pos:
        raise StoreRequirementError(f"{STUDY}: {where} lacks positions -2/-1 (has {sorted(pos)}); {hint}")
    cap = capture_of(ds.attrs)
    tmpl = cap.template.spec if cap is not None else "none"
    if tmpl != "none":
        raise StoreRequirementError(
            f"{STUDY}: {where} was extracted with template {tmpl!r}, so its last tokens are the template's, not "
            f"the statement's; {hint}"
        )
    lab = np.asarray(ds["label"].values)
    if lab.dtype.kind not in "iub" or not set(np.unique(lab).tolist()) <= {0, 1}:
        raise StoreRequirementError(f"{STUDY}: {where} 'label' column must be 0/1 (true = 1); re-extract from statement CSVs")
    if "split" in ds.coords or "split" in ds.data_vars:
        bad = set(_strs(ds["split"].values).tolist()) - {"train", "test"}
        if bad:
            raise StoreRequirementError(f"{STUDY}: {where} 'split' column has values {sorted(bad)}; expected train/test")


def _strs(values: Any) -> np.ndarray:
    """Any string-like column (zarr's StringDType, object, unicode) as an object array of str."""
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=object)


def _data_from_store(ds: xr.Dataset, shots: Mapping[str, Sequence[tuple[str, int]]] | None) -> TruthData:
    split = _strs(ds["split"].values) if ("split" in ds.coords or "split" in ds.data_vars) else None
    return TruthData(
        texts=[str(t) for t in np.asarray(ds["text"].values).tolist()],
        labels=np.asarray(ds["label"].values).astype(np.int64),
        topics=_strs(ds["topic"].values),
        split=split,
        shots={k: list(v) for k, v in (shots or {}).items()},
    )


def _same_statements(stores: Mapping[str, xr.Dataset], data: TruthData) -> None:
    for name, ds in stores.items():
        d = _data_from_store(ds, None)
        if d.texts != data.texts or not np.array_equal(d.labels, data.labels) or not np.array_equal(d.topics, data.topics):
            raise StoreRequirementError(
                f"{STUDY}: the store of {name} holds other statements than the first model's; extract the same "
                "statement files for every model of the group"
            )


def _folds(data: TruthData, settings: TruthSettings) -> list[str]:
    topics = data.topic_names
    if settings.heldout_topics is None:
        if len(topics) < 2:
            raise ValueError(
                f"{STUDY}: statements of at least 2 topics are needed to test on a held-out topic (found {topics})"
            )
        return topics
    miss = [t for t in settings.heldout_topics if t not in topics]
    if miss:
        raise ValueError(f"{STUDY}: held-out topics {miss} not among the statements' topics {topics}")
    if len(set(topics) - set(settings.heldout_topics)) < 1:
        raise ValueError(f"{STUDY}: holding out {list(settings.heldout_topics)} leaves no topic to train on")
    return list(settings.heldout_topics)


# ---------------------------------------------------------------------------------------------
# probes and cosines (stores only)


def probe_analysis(
    stores: Mapping[str, xr.Dataset],
    settings: TruthSettings = TruthSettings(),
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    shots: Mapping[str, Sequence[tuple[str, int]]] | None = None,
) -> tuple[xr.Dataset, TruthData]:
    """Directions, probe accuracies, transfer accuracies and cosines from the stores alone.

    ``stores``: model label -> opened store (same statements in each). Returns the results Dataset and the
    statements' :class:`TruthData`. One dask pass per store for the class sums and one for the projections.

    With ``settings.probe_position`` None, each final position is tried and the one whose best-layer validation
    accuracy (mean over models) is highest is kept; ties go to the period, the usual choice. Models differ in
    where they keep a statement's truth: one that judges truth after a prompt suffix may keep it on the last
    word rather than the period. ``attrs``: ``probe_position`` and ``probe_position_val_acc`` (JSON).

    ``settings.probe_layer`` fixes every model's probe layer (``best_layer``) to that layer (positions are then
    compared at it); ``settings.center_by_topic`` centres each topic's activations on their mean first (see
    :class:`TruthSettings`).
    """
    tries = [settings.probe_position] if settings.probe_position is not None else list(PROBE_POSITIONS)
    best = None
    scores: dict[int, float] = {}
    sums: dict[str, Any] = {}  # the class sums cover every position: one pass over the stores serves all tries
    for pos in tries:
        res, data = _probe_analysis_at(stores, replace(settings, probe_position=pos), pairs=pairs, shots=shots,
                                       sums_cache=sums)
        val = res["val_acc"].mean("fold")
        val = val.sel(layer=settings.probe_layer) if settings.probe_layer is not None else val.max("layer")
        scores[pos] = float(val.mean("model"))
        if best is None or scores[pos] > scores[best[0]]:
            best = (pos, res, data)
    _, res, data = best
    res.attrs["probe_position_val_acc"] = json.dumps({str(k): v for k, v in scores.items()})
    return res, data


def _probe_analysis_at(
    stores: Mapping[str, xr.Dataset],
    settings: TruthSettings,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    shots: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    sums_cache: dict[str, Any] | None = None,
) -> tuple[xr.Dataset, TruthData]:
    import dask

    if not stores:
        raise ValueError("no stores given")
    for ds in stores.values():
        check_truth_store(ds, settings)
    names = list(stores)
    first = stores[names[0]]
    data = _data_from_store(first, shots)
    _same_statements(stores, data)
    widths = {n: stores[n].sizes[[d for d in stores[n][settings.site].dims if d in ("hidden", "neuron")][0]] for n in names}
    layers_of = {n: tuple(int(l) for l in stores[n]["layer"].values) for n in names}
    if len(set(widths.values())) != 1 or len(set(layers_of.values())) != 1:
        raise ValueError(f"{STUDY}: models differ in width {widths} or layers; directions cannot be compared")
    layers = np.asarray(layers_of[names[0]])
    if settings.probe_layer is not None and settings.probe_layer not in layers:
        raise TruthSettingsError(
            f"{STUDY}: probe_layer {settings.probe_layer} is not among the stored layers {layers.tolist()}; choose one of "
            "them (or leave it unset for each model's best layer)"
        )
    pairs = list(pairs) if pairs is not None else [(names[0], n) for n in names[1:]]

    folds = _folds(data, settings)
    fit = data.fit_mask(settings)
    topics = data.topics
    y = data.labels.astype(bool)

    # 1) class sums per topic over the fit rows: every fold's direction derives from them.
    # And the same with labels shuffled within each topic: the cosine two models' "directions" have when there is
    # no truth signal at all (shared sampling noise of the same statements; high when post ~ base).
    shuffled = data.labels.copy()
    rng = np.random.default_rng(settings.seed + 7)
    for t in data.topic_names:
        idx = np.flatnonzero(topics == t)
        shuffled[idx] = rng.permutation(shuffled[idx])
    centred = settings.center_by_topic
    if sums_cache and "sums" in sums_cache:
        sums, null_sums, means = sums_cache["sums"], sums_cache["null_sums"], sums_cache["means"]
    else:
        lazy = {n: mean_diff_sums(stores[n], settings.site, data.labels, rows=fit, center_by=topics, compute=False) for n in names}
        lazy_null = {n: mean_diff_sums(stores[n], settings.site, shuffled, rows=fit, center_by=topics, compute=False) for n in names}
        # the paper's centring subtracts each topic's mean over all its statements (no labels used): their sums too,
        # in the same pass over the stores
        lazy_all = {n: mean_diff_sums(stores[n], settings.site, data.labels, center_by=topics, compute=False) for n in names} if centred else {}
        # one dask pass per store (its reductions share the chunk reads); stores one after another, so that the
        # chunks in flight are one store's
        sums, null_sums, means = {}, {}, {}
        for n in names:
            t = dask.compute(lazy[n].total, lazy_null[n].total, *([lazy_all[n].total] if centred else []))
            sums[n], null_sums[n] = lazy[n].finish(t[0]), lazy_null[n].finish(t[1])
            if centred:
                means[n] = _topic_means(lazy_all[n].finish(t[2]))
        if sums_cache is not None:
            sums_cache.update(sums=sums, null_sums=null_sums, means=means)
    topic_keys = [t for t in data.topic_names if t in sums[names[0]].groups]

    def direction(n: str, keep: Sequence[str]) -> np.ndarray:  # [layer, position, width]
        return _centred_diff(sums[n], keep, means.get(n))

    full = {n: direction(n, topic_keys) for n in names}
    fold_dirs = {n: np.stack([direction(n, [t for t in topic_keys if t != h]) for h in folds]) for n in names}
    pos_coord = np.asarray(stores[names[0]]["position"].values)
    p_idx = int(np.flatnonzero(pos_coord == settings.probe_position)[0])

    # 2) projections of every store's probe-position activations on every model's fold directions, and 3) the probes
    # fitted on them: own (validation + held-out test) and transferred (unrefitted / refitted threshold). The scores
    # of every layer at once ([example, source, fold, layer] float64: ~512 MB per model at 100k statements) are
    # never formed: a block of layers at a time is projected (one dask pass per block, reading only its layers'
    # chunks) and reduced at once to thresholds and accuracies, so the scores held are at most
    # PROJECTION_BLOCK_BYTES (one layer, n * models * folds * 8 bytes, when a single layer is more).
    D = np.stack([fold_dirs[n][:, :, p_idx, :] for n in names])  # [source, fold, layer, width]
    Dx = xr.DataArray(D, dims=("source", "fold", "layer", "width"), coords={"source": names, "fold": folds, "layer": layers})
    S, F, L = len(names), len(folds), len(layers)
    val_acc = np.full((S, F, L), np.nan)
    fit_acc = np.full((S, F, L), np.nan)  # accuracy on the training rows: the layer choice when no row validates
    test_acc = np.full((S, S, F, L, 2), np.nan)  # source, target, fold, layer, (unrefit, refit)
    thresholds = np.full((S, F, L), np.nan)
    # per layer, whether each model's own probe is right on each held-out row (in its topic's fold): what the
    # accuracy's bootstrap resamples once the best layer is known
    own_correct = np.zeros((S, L, len(y)), dtype=bool)
    xs = {}
    for n in names:
        x = stores[n][settings.site].sel(position=settings.probe_position)
        wdim = [d for d in x.dims if d in ("hidden", "neuron")][0]
        xs[n] = x.rename({wdim: "width"}).drop_vars(["width"], errors="ignore")
    per_layer = len(y) * S * F * 8
    step = max(1, PROJECTION_BLOCK_BYTES // max(per_layer, 1))
    for l0 in range(0, L, step):
        block = slice(l0, min(L, l0 + step))
        projs = {}
        for n in names:
            lazy_p = xr.dot(xs[n].isel(layer=block).astype(np.float64), Dx.isel(layer=block), dim="width")
            projs[n] = np.asarray(lazy_p.transpose("example", "source", "fold", "layer").data.compute())  # [example, source, fold, layer in block]
            if centred:
                # (x - topic mean) . d == x . d - mean over the topic's rows of x . d: every probe score (fit, validation,
                # held-out and transferred: each target centred on its own means) as of centred activations
                projs[n] = _centre_rows(projs[n], topics)
        for bi, l in enumerate(range(block.start, block.stop)):
            for f, h in enumerate(folds):
                train_rows = fit & (topics != h)
                val_rows = ~fit & (topics != h)
                test_rows = topics == h
                for si, s in enumerate(names):
                    own = projs[s][:, si, f, bi]
                    t, _ = best_threshold(own[train_rows], y[train_rows])
                    thresholds[si, f, l] = t
                    fit_acc[si, f, l] = np.mean((own[train_rows] > t) == y[train_rows])
                    if val_rows.any():
                        val_acc[si, f, l] = np.mean((own[val_rows] > t) == y[val_rows])
                    own_correct[si, l, test_rows] = (own[test_rows] > t) == y[test_rows]
                    for ti, tname in enumerate(names):
                        sc = projs[tname][:, si, f, bi]
                        test_acc[si, ti, f, l, 0] = np.mean((sc[test_rows] > t) == y[test_rows])
                        if ti == si:
                            test_acc[si, ti, f, l, 1] = test_acc[si, ti, f, l, 0]
                        else:
                            t2, _ = best_threshold(sc[train_rows], y[train_rows])
                            test_acc[si, ti, f, l, 1] = np.mean((sc[test_rows] > t2) == y[test_rows])
        del projs
    if np.isnan(val_acc).all():
        # no validation rows (every row is in the fit split): choose on the fit rows' own accuracy instead
        val_acc = fit_acc
    mean_val = np.nanmean(val_acc, axis=1)  # [source, layer]
    if settings.probe_layer is not None:
        best = np.full(S, int(np.flatnonzero(layers == settings.probe_layer)[0]))  # the paper's: one layer for all
    else:
        best = np.asarray([int(np.nanargmax(mean_val[si])) for si in range(S)])  # first of the maxima
    # per-statement correctness of each model's own probe on its held-out topic at its best layer (NaN: not
    # held out in that fold): what the accuracy's bootstrap interval resamples
    correct = np.full((S, F, len(y)), np.nan)
    for f, h in enumerate(folds):
        test_rows = topics == h
        for si in range(S):
            correct[si, f, test_rows] = own_correct[si, best[si], test_rows]

    # 4) cosines between models per layer / position, and layer x layer at the probe position.
    dirs = xr.DataArray(
        np.stack([full[n] for n in names]),
        dims=("model", "layer", "position", "hidden"),
        coords={"model": names, "layer": layers, "position": pos_coord},
    )
    pair_names = [f"{a}_vs_{b}" for a, b in pairs]
    cos = xr.concat([cosine_by_layer(dirs.sel(model=a), dirs.sel(model=b)) for a, b in pairs], dim="pair")
    cos = cos.assign_coords(pair=pair_names)
    cmat = xr.concat(
        [cosine_matrix(dirs.sel(model=a, position=settings.probe_position), dirs.sel(model=b, position=settings.probe_position)) for a, b in pairs],
        dim="pair",
    ).assign_coords(pair=pair_names)
    null = {n: _unitv(_centred_diff(null_sums[n], topic_keys, means.get(n))[:, p_idx]) for n in names}
    null_cos = np.stack([np.einsum("lw,lw->l", null[a], null[b]) for a, b in pairs])
    # cosines of the fold directions too (the ones probes and interventions use)
    fold_cos = np.stack(
        [
            np.einsum("flw,flw->fl", _unitv(fold_dirs[a][:, :, p_idx]), _unitv(fold_dirs[b][:, :, p_idx]))
            for a, b in pairs
        ]
    )

    res = xr.Dataset(
        {
            "direction": dirs,
            "scale": np.sqrt((dirs**2).sum("hidden")),
            "fold_direction": (("model", "fold", "layer", "hidden"), np.stack([fold_dirs[n][:, :, p_idx] for n in names])),
            "cosine": cos.drop_vars([c for c in cos.coords if c not in ("pair", "layer", "position")]),
            "cosine_matrix": cmat.drop_vars([c for c in cmat.coords if c not in ("pair", "layer_a", "layer_b")]),
            "fold_cosine": (("pair", "fold", "layer"), fold_cos),
            "null_cosine": (("pair", "layer"), null_cos),
            "val_acc": (("model", "fold", "layer"), val_acc),
            "threshold": (("model", "fold", "layer"), thresholds),
            "transfer_acc": (("source", "target", "fold", "layer", "mode"), test_acc),
            "best_layer": (("model",), layers[best]),
            "heldout_correct": (("model", "fold", "example"), correct),
        },
        coords={
            "model": names,
            "source": names,
            "target": names,
            "fold": folds,
            "layer": layers,
            "layer_a": layers,
            "layer_b": layers,
            "position": pos_coord,
            "pair": pair_names,
            "pair_a": ("pair", [a for a, _ in pairs]),
            "pair_b": ("pair", [b for _, b in pairs]),
            "mode": ["unrefit", "refit"],
        },
        attrs={
            "study": STUDY,
            "site": settings.site,
            "probe_position": settings.probe_position,
            "center_by_topic": int(settings.center_by_topic),
            "layer_choice": "fixed" if settings.probe_layer is not None else "validation",
            "n_fit": int(fit.sum()),
            "n_examples": len(data.texts),
        },
    )
    return res, data


def _unitv(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _topic_means(s: Any) -> dict[Any, np.ndarray]:
    """topic -> its mean activation [layer, position, width] over every row the sums saw (both labels)."""
    total = s.group_count_pos + s.group_count_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (s.group_sum_pos + s.group_sum_neg) / total[..., None]
    return {k: np.where(total[g][..., None] > 0, mu[g], 0.0) for g, k in enumerate(s.groups)}


def _centred_diff(s: Any, keep: Sequence[Any], means: Mapping[Any, np.ndarray] | None) -> np.ndarray:
    """Difference of class means over the rows of the sums ``s`` in topics ``keep`` [layer, position, width]; with
    ``means`` (topic -> mean over all its statements) each row first has its topic's mean subtracted."""
    sel = s.select_groups(list(keep))
    if means is None:
        return sel.uncentred().diff
    mu = np.stack([means[k] for k in keep])  # [topic, layer, position, width]
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = (sel.sum_pos - np.einsum("g...,g...w->...w", sel.group_count_pos, mu)) / sel.count_pos[..., None]
        neg = (sel.sum_neg - np.einsum("g...,g...w->...w", sel.group_count_neg, mu)) / sel.count_neg[..., None]
    return pos - neg


def _centre_rows(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``x`` [example, ...] with each group's mean over its rows (NaN rows left out) subtracted from its rows."""
    out = np.array(x, dtype=np.float64)
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups.tolist()):
        rows = groups == g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a slot no row of the group has stays NaN
            out[rows] -= np.nanmean(out[rows], axis=0)
    return out


def _rows_at(ds: xr.Dataset, layer: int, data: TruthData, settings: TruthSettings) -> Any:
    """Every statement's activations [example, width] float64 at ``layer`` and the probe position, centred per topic
    (each topic's nan-mean over all its rows, as :func:`_centre_rows`) as the probes are when
    ``settings.center_by_topic``. Lazy: a dask array over the store's chunks (the topic means, when centring, are one
    streamed pass over this layer); index the rows needed and reduce, or compute a bounded subset."""
    import dask.array as da

    from mechdiff.analyses.directions import centre_by_group, group_means

    v = ds[settings.site].sel(layer=layer, position=settings.probe_position).data
    x = (v if isinstance(v, da.Array) else da.from_array(np.asarray(v), chunks=(256, -1))).astype(np.float64)
    if not settings.center_by_topic:
        return x
    keys, means = group_means(x, data.topics, skipna=True)
    return centre_by_group(x, data.topics, means, keys)


# ---------------------------------------------------------------------------------------------
# intervention (runs the models)


def truth_prompts(statements: Sequence[str], shots: Sequence[tuple[str, int]], settings: TruthSettings = TruthSettings()) -> list[tuple[str, str]]:
    """(prompt, prefix) per statement: the few-shot prompt ending in the suffix, and its text up to the end of
    the statement (whose last two tokens the intervention targets)."""
    head = "".join(f"{s}{settings.suffix} {settings.label_words[int(l)]}\n" for s, l in shots)
    return [(head + s + settings.suffix, head + s) for s in statements]


def statement_end_positions(tokenizer: Any, prompts: Sequence[tuple[str, str]], k: int = 2) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each prompt (with the tokenizer's special tokens, as in extraction) and the indices of the
    statement's last ``k`` tokens, [n, k]. The prefix's tokens must be a prefix of the prompt's tokens (true for
    tokenizers that split at the space before the suffix); otherwise character offsets decide."""
    full = tokenizer([p for p, _ in prompts], add_special_tokens=True)["input_ids"]
    pref = tokenizer([q for _, q in prompts], add_special_tokens=True)["input_ids"]
    out = np.zeros((len(prompts), k), dtype=np.int64)
    for i, (f, q) in enumerate(zip(full, pref)):
        if len(q) < k or list(f[: len(q)]) != list(q):
            end = _end_by_offsets(tokenizer, prompts[i], f)
        else:
            end = len(q)
        if end < k:
            raise ValueError(f"statement {i} has fewer than {k} tokens in its prompt")
        out[i] = np.arange(end - k, end)
    return [list(x) for x in full], out


def _end_by_offsets(tokenizer: Any, pq: tuple[str, str], ids: Sequence[int]) -> int:
    """One past the prompt's last token that ends inside the prefix (``ids``: the prompt's tokens)."""
    prompt, prefix = pq
    offsets = char_offsets(tokenizer, prompt, ids)
    if offsets is None:
        raise ValueError(
            "cannot locate the statement's last tokens: the statement's tokens change when the suffix follows and "
            "the tokenizer gives no character offsets"
        )
    return max((j + 1 for j, (a, b) in enumerate(offsets) if b > a and b <= len(prefix)), default=0)


def _label_token_ids(tokenizer: Any, prompt: str, words: tuple[str, str]) -> tuple[int, int]:
    """The first token the model would emit for " FALSE" / " TRUE" after ``prompt``."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    f_id, t_id = (answer_token(tokenizer, prompt, ids, w) for w in words)
    if f_id == t_id:
        raise ValueError(f"label words {words} start with the same token; choose distinguishable words")
    return f_id, t_id


def truth_logits(
    lm: Any,
    prompts: Sequence[tuple[str, str]],
    *,
    settings: TruthSettings = TruthSettings(),
    vectors: Mapping[int, np.ndarray] | None = None,
    signs: np.ndarray | None = None,
    coef: float = 1.0,
) -> np.ndarray:
    """Next-token logits at the end of each prompt, [n, vocab] float32, optionally with an intervention.

    ``vectors``: layer -> vector (already scaled); at ``settings.site`` of each such layer, ``coef * signs[i] *
    vector`` is added at prompt i's statement's last two tokens (``signs``: +1 = add, -1 = subtract, 0 = none).
    Runs the engine's last-token scoring with its ``Add`` intervention hooks in left-padded batches (positions shifted
    by the padding).
    """
    import torch

    from mechdiff.engine.batching import length_batches, pad_batch
    from mechdiff.engine.scoring import last_token_logits
    from mechdiff.engine.sites import Add

    tok = lm.tokenizer
    ids, ends = statement_end_positions(tok, prompts)
    signs = np.zeros(len(prompts)) if signs is None else np.asarray(signs, dtype=np.float64)
    if vectors and signs.shape != (len(prompts),):
        raise ValueError(f"signs has shape {signs.shape}, expected ({len(prompts)},)")
    lengths = [len(x) for x in ids]
    out: np.ndarray | None = None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for batch in length_batches(lengths, list(range(len(prompts))), settings.token_budget):
        inputs = pad_batch([ids[i] for i in batch], pad_id, side="left", device=lm.device)
        T = inputs["input_ids"].shape[1]
        shift = torch.as_tensor([T - lengths[i] for i in batch])[:, None]
        pos = torch.as_tensor(ends[batch]) + shift  # [B, 2] indices in the padded batch
        ivs = []
        if vectors:
            sg = torch.as_tensor(signs[batch])
            # one intervention per sign and layer; rows of the other sign get index -1 (left alone)
            for s in (1.0, -1.0):
                rows = (sg == s)[:, None]
                if not bool(rows.any()):
                    continue
                index = torch.where(rows, pos, torch.full_like(pos, -1)).to(lm.device)
                for layer, v in vectors.items():
                    vec = torch.as_tensor(np.asarray(v, dtype=np.float64))
                    ivs.append(Add(settings.site, int(layer), vec, s * coef, index=index))
        with torch.inference_mode():
            logits = last_token_logits(lm, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       position_ids=inputs["position_ids"], interventions=ivs, use_cache=False)
        logits = logits.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(prompts), logits.shape[-1]), dtype=np.float32)
        out[batch] = logits
    assert out is not None
    return out


def truth_margins(
    lm: Any,
    prompts: Sequence[tuple[str, str]],
    *,
    settings: TruthSettings = TruthSettings(),
    vectors: Mapping[int, np.ndarray] | None = None,
    signs: np.ndarray | None = None,
    coef: float = 1.0,
) -> np.ndarray:
    """P(TRUE) - P(FALSE) for the next token after each prompt (softmax over the whole vocabulary), with the
    optional intervention of :func:`truth_logits`."""
    f_id, t_id = _label_token_ids(lm.tokenizer, prompts[0][0], settings.label_words)
    logits = truth_logits(lm, prompts, settings=settings, vectors=vectors, signs=signs, coef=coef).astype(np.float64)
    # numpy, not engine.scoring.answer_readout: torch's softmax sums the vocabulary in another order, which moves
    # the last bits (~1e-16) of every recorded P(TRUE) - P(FALSE)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return p[:, t_id] - p[:, f_id]


def _auto_layers(best: int, n_layers: int, settings: TruthSettings) -> tuple[int, ...]:
    if settings.iv_layers is not None:
        bad = [l for l in settings.iv_layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"intervention layers {bad} out of range 0..{n_layers - 1}")
        return tuple(settings.iv_layers)
    w = settings.iv_window or max(1, n_layers // 4)
    # The last layer's resid_post at the statement's tokens cannot reach the final position's logits (no
    # attention follows it), so the window ends at the second-to-last layer at the latest.
    end = min(best, n_layers - 2)
    if end < 0:
        raise ValueError("a one-layer model leaves no layer whose change could reach the answer token")
    return tuple(range(max(0, end - w + 1), end + 1))


def _pick_statements(data: TruthData, topic: str, fit: np.ndarray, n: int, seed: int, exclude: set[str] = frozenset()) -> np.ndarray:
    """Up to ``n`` rows of ``topic``, half true and half false, in a seeded draw: held-out subjects (outside the
    fit rows) first, then other rows of the topic when a label has too few; never a few-shot example."""
    rng = np.random.default_rng(seed)
    rows = []
    in_topic = (data.topics == topic) & ~np.isin(np.asarray(data.texts, dtype=object), list(exclude))
    for label in (0, 1):
        cand = in_topic & (data.labels == label)
        held, rest = np.flatnonzero(cand & ~fit), np.flatnonzero(cand & fit)
        pick = np.concatenate([rng.permutation(held), rng.permutation(rest)])[: n // 2]
        if pick.size == 0:
            raise ValueError(f"{STUDY}: topic {topic!r} has no {'true' if label else 'false'} statement to intervene on")
        rows.append(pick)
    return np.sort(np.concatenate(rows))


def _shots_for(data: TruthData, topic: str, fit: np.ndarray, settings: TruthSettings) -> list[tuple[str, int]]:
    if topic in data.shots:
        return list(data.shots[topic])[: settings.n_shots] if settings.n_shots else []
    rng = np.random.default_rng(settings.seed + 1)
    out: list[tuple[str, int]] = []
    for i in range(settings.n_shots):
        label = (i + 1) % 2  # alternate TRUE, FALSE
        pool = np.flatnonzero((data.topics == topic) & fit & (data.labels == label))
        pool = [j for j in pool if data.texts[j] not in {s for s, _ in out}]
        if pool:
            j = pool[int(rng.integers(len(pool)))]
            out.append((data.texts[j], label))
    return out


def intervention_analysis(
    models: Mapping[str, Any],
    res: xr.Dataset,
    data: TruthData,
    settings: TruthSettings = TruthSettings(),
) -> xr.Dataset:
    """NIE of own and transferred directions for every target model and held-out topic.

    For target model B and held-out topic h: prompts from h's held-out statements; the direction of source model S
    fitted without h (``res.fold_direction``), unit-normalised and scaled by B's (``transfer_scale="target"``) or
    S's mean-difference norm at that layer, times ``coef``; added to false and subtracted from true statements at
    their last two tokens over B's layer range.
    """
    names = [str(n) for n in res["model"].values]
    missing = [n for n in names if n not in models]
    if missing:
        raise ValueError(f"no loaded model for {missing}")
    folds = [str(f) for f in res["fold"].values]
    layers = [int(l) for l in res["layer"].values]
    fit = data.fit_mask(settings)
    FD = res["fold_direction"].values  # [model, fold, layer, width]
    norms = np.linalg.norm(FD, axis=-1)  # [model, fold, layer]
    best_idx = {n: layers.index(int(res["best_layer"].sel(model=n))) for n in names}

    S, F = len(names), len(folds)
    kinds = ["false_to_true", "true_to_false", "mean"]
    pd_clean = np.full((S, F, 2), np.nan)  # target, fold, label
    pd_int = np.full((S, S, F, 2), np.nan)  # target, source, fold, label
    nie = np.full((S, S, F, 3), np.nan)
    clean_acc = np.full((S, F), np.nan)
    iv_layers = {}
    for ti, tname in enumerate(names):
        lm = models[tname]
        lay = _auto_layers(layers[best_idx[tname]], lm.adapter.n_layers, settings)
        iv_layers[tname] = list(lay)
        for f, h in enumerate(folds):
            shots = _shots_for(data, h, fit, settings)
            rows = _pick_statements(data, h, fit, settings.n_intervene, settings.seed, {s for s, _ in shots})
            y = data.labels[rows]
            prompts = truth_prompts([data.texts[i] for i in rows], shots, settings)
            clean = truth_margins(lm, prompts, settings=settings)
            pd_clean[ti, f] = [clean[y == 0].mean(), clean[y == 1].mean()]
            clean_acc[ti, f] = np.mean((clean > 0) == (y == 1))
            gap = pd_clean[ti, f, 1] - pd_clean[ti, f, 0]
            signs = np.where(y == 0, 1.0, -1.0)  # add to false, subtract from true
            for si, sname in enumerate(names):
                vecs = {}
                for l in lay:
                    # "best": every layer of the range gets the direction at the target's best layer, so own
                    # and transferred runs differ only in whose direction it is.
                    li = layers.index(l) if settings.direction_layer == "each" else best_idx[tname]
                    d = FD[si, f, li]
                    scale = norms[ti if settings.transfer_scale == "target" else si, f, li]
                    vecs[l] = d / max(float(np.linalg.norm(d)), 1e-30) * scale
                moved = truth_margins(lm, prompts, settings=settings, vectors=vecs, signs=signs, coef=settings.coef)
                pd_int[ti, si, f] = [moved[y == 0].mean(), moved[y == 1].mean()]
                if abs(gap) > 1e-9:
                    nie[ti, si, f, 0] = (pd_int[ti, si, f, 0] - pd_clean[ti, f, 0]) / gap
                    nie[ti, si, f, 1] = (pd_int[ti, si, f, 1] - pd_clean[ti, f, 1]) / -gap
                    nie[ti, si, f, 2] = nie[ti, si, f, :2].mean()
    out = xr.Dataset(
        {
            "pd_clean": (("target", "fold", "label"), pd_clean),
            "pd_intervened": (("target", "source", "fold", "label"), pd_int),
            "nie": (("target", "source", "fold", "kind"), nie),
            "clean_accuracy": (("target", "fold"), clean_acc),
            "gap": (("target", "fold"), pd_clean[..., 1] - pd_clean[..., 0]),
        },
        coords={"target": names, "source": names, "fold": folds, "label": [0, 1], "kind": kinds},
        attrs={
            "iv_layers": json.dumps(iv_layers),
            "coef": settings.coef,
            "direction_layer": settings.direction_layer,
            "transfer_scale": settings.transfer_scale,
        },
    )
    return out


# ---------------------------------------------------------------------------------------------
# controls and the verdict (pure functions over arrays: testable on planted data)


def truth_verdict(
    cosine: float,
    interval: tuple[float, float],
    null_upper: float,
    ceiling: float,
    accuracy: Mapping[str, tuple[float, float, float]],
    settings: TruthSettings = TruthSettings(),
) -> tuple[str, str]:
    """(verdict, reason) for "truth direction shared", from the measurement and its controls. In order:

    1. a model without a truth direction (own held-out accuracy < ``min_probe_acc`` or its 95% interval not
       above 0.5 + ``chance_margin``): ``inconclusive``, there is nothing to share;
    2. the cosine's interval above the shuffled-label null's upper bound and the cosine within
       ``ceiling_tolerance`` of the split-half ceiling: ``agrees``;
    3. the cosine's interval entirely below the null's upper bound: ``disagrees``;
    4. otherwise ``inconclusive``.
    ``accuracy``: model -> (held-out accuracy, interval low, interval high).
    """
    floor = 0.5 + settings.chance_margin
    weak = [
        f"{m} (held-out accuracy {acc:.2f}, 95% CI [{lo:.2f}, {hi:.2f}])"
        for m, (acc, lo, hi) in accuracy.items()
        if not (acc >= settings.min_probe_acc and lo > floor)
    ]
    if weak:
        return "inconclusive", (
            f"no truth direction in {', '.join(weak)}: needs accuracy >= {settings.min_probe_acc:g} with its "
            f"interval above {floor:g}"
        )
    lo, hi = interval
    what = f"cosine {cosine:.2f} (95% CI [{lo:.2f}, {hi:.2f}])"
    null = f"shuffled-label null upper bound {null_upper:.2f}"
    if not all(math.isfinite(v) for v in (cosine, lo, hi, null_upper, ceiling)):
        return "inconclusive", f"{what}, {null}, ceiling {ceiling:.2f}: a number is undefined"
    if lo > null_upper and cosine >= ceiling - settings.ceiling_tolerance:
        return "agrees", (
            f"{what} above the {null} and within {settings.ceiling_tolerance:g} of the split-half ceiling {ceiling:.2f}"
        )
    if hi < null_upper:
        return "disagrees", f"{what} entirely below the {null}, with a truth direction in both models"
    if lo > null_upper:
        return "inconclusive", (
            f"{what} above the {null} but more than {settings.ceiling_tolerance:g} below the split-half ceiling "
            f"{ceiling:.2f}: partly shared"
        )
    return "inconclusive", f"{what} overlaps the {null}"


def truth_controls(
    stores: Mapping[str, xr.Dataset], res: xr.Dataset, data: TruthData, settings: TruthSettings
) -> dict[str, dict[str, Any]]:
    """:func:`direction_controls` and each model's :func:`accuracy_interval` per pair of ``res``, at the pair's
    chosen layer (the first model's best layer, or the fixed ``probe_layer``) and the probe position, over the fit
    rows (centred per topic over all its statements, as the directions are, with ``center_by_topic``)."""
    fit = data.fit_mask(settings)
    best = {str(n): int(res["best_layer"].sel(model=n)) for n in res["model"].values}
    acc = {
        n: accuracy_interval(res["heldout_correct"].sel(model=n).values, n_bootstrap=settings.n_bootstrap, seed=settings.seed + 11)
        for n in best
    }
    out = {}
    for p, a, b in zip(res["pair"].values, res["pair_a"].values, res["pair_b"].values):
        a, b = str(a), str(b)
        # lazy rows: direction_controls streams them chunk by chunk (the layer is never loaded whole)
        X = {m: _rows_at(stores[m], best[a], data, settings)[np.flatnonzero(fit)] for m in (a, b)}
        c = direction_controls(
            X[a], X[b], data.labels[fit], groups=data.topics[fit], center=False,  # centred above, on all rows
            n_null=settings.n_null, null_quantile=settings.null_quantile, n_splits=settings.n_splits,
            n_bootstrap=settings.n_bootstrap, seed=settings.seed + 13,
        )
        c["layer"] = best[a]
        c["split_half"] = {a: c["split_half"]["a"], b: c["split_half"]["b"]}
        c["accuracy"] = {a: acc[a], b: acc[b]}
        out[str(p)] = c
    return out


# ---------------------------------------------------------------------------------------------
# the study


def _summary(res: xr.Dataset, iv: xr.Dataset | None, settings: TruthSettings) -> dict[str, Any]:
    names = [str(n) for n in res["model"].values]
    layers = [int(l) for l in res["layer"].values]
    best = {n: int(res["best_layer"].sel(model=n)) for n in names}
    acc = res["transfer_acc"].mean("fold")  # source, target, layer, mode
    summ: dict[str, Any] = {
        "settings": asdict(settings),
        "layers": layers,
        "folds": [str(f) for f in res["fold"].values],
        "best_layer": best,
        "val_acc_by_layer": {n: res["val_acc"].sel(model=n).mean("fold").values for n in names},
        "probe_acc_by_layer": {n: acc.sel(source=n, target=n, mode="unrefit").values for n in names},
        "probe_acc_best": {n: float(acc.sel(source=n, target=n, mode="unrefit", layer=best[n])) for n in names},
        "probe_acc_by_fold_best": {
            n: dict(zip(res["fold"].values.tolist(), res["transfer_acc"].sel(source=n, target=n, mode="unrefit", layer=best[n]).values))
            for n in names
        },
        "transfer_acc_best": {
            s: {t: {m: float(acc.sel(source=s, target=t, mode=m, layer=best[s])) for m in ("unrefit", "refit")} for t in names}
            for s in names
        },
        "cosine_by_layer": {
            str(p): {int(pos): res["cosine"].sel(pair=p, position=pos).values for pos in res["position"].values}
            for p in res["pair"].values
        },
        "null_cosine_by_layer": {str(p): res["null_cosine"].sel(pair=p).values for p in res["pair"].values},
        "fold_cosine_by_layer": {str(p): res["fold_cosine"].sel(pair=p).mean("fold").values for p in res["pair"].values},
        "cosine_best": {},
        "direction_norm_by_layer": {n: res["scale"].sel(model=n, position=settings.probe_position).values for n in names},
    }
    for p, a, b in zip(res["pair"].values, res["pair_a"].values, res["pair_b"].values):
        summ["cosine_best"][str(p)] = {
            f"at_{a}_best": float(res["cosine"].sel(pair=p, position=settings.probe_position, layer=best[str(a)])),
            f"at_{b}_best": float(res["cosine"].sel(pair=p, position=settings.probe_position, layer=best[str(b)])),
        }
    if iv is not None:
        summ["intervention"] = {
            "layers": json.loads(iv.attrs["iv_layers"]),
            "coef": settings.coef,
            "nie_mean": {
                t: {s: float(iv["nie"].sel(target=t, source=s, kind="mean").mean("fold")) for s in names} for t in names
            },
            "nie": {
                t: {
                    s: {k: float(iv["nie"].sel(target=t, source=s, kind=k).mean("fold")) for k in ("false_to_true", "true_to_false")}
                    for s in names
                }
                for t in names
            },
            "nie_by_fold": {
                t: {s: dict(zip(iv["fold"].values.tolist(), iv["nie"].sel(target=t, source=s, kind="mean").values)) for s in names}
                for t in names
            },
            "pd_clean": {t: {"false": float(iv["pd_clean"].sel(target=t, label=0).mean()), "true": float(iv["pd_clean"].sel(target=t, label=1).mean())} for t in names},
            "clean_accuracy": {t: float(iv["clean_accuracy"].sel(target=t).mean()) for t in names},
            "gap": {t: float(iv["gap"].sel(target=t).mean()) for t in names},
        }
    return summ


def _findings(res: xr.Dataset, iv: xr.Dataset | None, summ: dict[str, Any], settings: TruthSettings,
              controls: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    out = []
    best = summ["best_layer"]
    ta = summ["transfer_acc_best"]
    for p, a, b in zip(res["pair"].values, res["pair_a"].values, res["pair_b"].values):
        a, b = str(a), str(b)
        c = controls[str(p)]
        cos = float(res["cosine"].sel(pair=p, position=settings.probe_position, layer=best[a]))
        fig: dict[str, float] = {
            "cosine_at_best_layer": cos,
            "cosine_null_upper": c["null_upper"],
            "cosine_ceiling": c["ceiling"],
            "best_layer_" + a: best[a],
            "best_layer_" + b: best[b],
            f"acc_{a}_own": ta[a][a]["unrefit"],
            f"acc_{b}_own": ta[b][b]["unrefit"],
            f"acc_{a}_dir_on_{b}_refit": ta[a][b]["refit"],
            f"acc_{a}_dir_on_{b}_unrefit": ta[a][b]["unrefit"],
            f"acc_{b}_dir_on_{a}_refit": ta[b][a]["refit"],
            f"acc_{b}_dir_on_{a}_unrefit": ta[b][a]["unrefit"],
        }
        null = float(res["null_cosine"].sel(pair=p, layer=best[a]))
        fig["null_cosine_at_best_layer"] = null
        lo, hi = c["interval"]
        controls_out = {
            "cosine_null_upper": c["null_upper"],
            "cosine_null_mean": c["null_mean"],
            "cosine_null_shared_upper": c["null_shared_upper"],
            f"split_half_{a}": c["split_half"][a],
            f"split_half_{b}": c["split_half"][b],
            "cosine_ceiling": c["ceiling"],
            "chance_accuracy": 0.5,
        }
        for m in (a, b):
            acc, alo, ahi = c["accuracy"][m]
            controls_out[f"acc_{m}_own_low"] = alo
            controls_out[f"acc_{m}_own_high"] = ahi
        verdict, reason = truth_verdict(cos, (lo, hi), c["null_upper"], c["ceiling"],
                                        {m: c["accuracy"][m] for m in (a, b)}, settings)
        where = f"the fixed probe layer {best[a]}" if settings.probe_layer is not None else f"{a}'s best layer {best[a]}"
        detail = [
            f"cosine {cos:.2f} (95% CI [{lo:.2f}, {hi:.2f}]) at {where}"
            + (" (activations centred per topic)" if settings.center_by_topic else "") + "; shuffled-label null "
            f"{c['null_mean']:.2f} (upper {c['null_upper']:.2f}; one shuffle shared by both models: upper "
            f"{c['null_shared_upper']:.2f}); split-half ceiling {c['ceiling']:.2f} ({a} {c['split_half'][a]:.2f}, "
            f"{b} {c['split_half'][b]:.2f} per half)",
            f"probe {a}->{b} {ta[a][b]['refit']:.2f} (refit) vs {b} own {ta[b][b]['unrefit']:.2f}; "
            f"{b}->{a} {ta[b][a]['refit']:.2f} vs {a} own {ta[a][a]['unrefit']:.2f}",
        ]
        # the cosine says the direction is shared; the probes and the intervention must carry over too
        # ("about as well": transferred probes within 5 points of the target's own probe)
        acc_ok = ta[a][b]["refit"] >= ta[b][b]["unrefit"] - 0.05 and ta[b][a]["refit"] >= ta[a][a]["unrefit"] - 0.05
        if verdict == "agrees" and not acc_ok:
            verdict = "disagrees"
            reason += "; but a transferred probe is more than 0.05 below the target's own"
        if iv is not None:
            nm = summ["intervention"]["nie_mean"]
            gaps = summ["intervention"]["gap"]
            fig.update({
                f"nie_{b}_own": nm[b][b], f"nie_{b}_with_{a}_dir": nm[b][a],
                f"nie_{a}_own": nm[a][a], f"nie_{a}_with_{b}_dir": nm[a][b],
                f"gap_{a}": gaps[a], f"gap_{b}": gaps[b],
            })
            iv_why, iv_bad = [], False
            for tgt, src in ((b, a), (a, b)):
                own, tr = nm[tgt][tgt], nm[tgt][src]
                if not gaps[tgt] >= settings.min_gap:
                    iv_why.append(
                        f"inconclusive: {tgt} does not tell true from false in the prompt (P(TRUE)-P(FALSE) gap "
                        f"{gaps[tgt]:.3f} < {settings.min_gap:g}), so NIE has no scale"
                    )
                elif not (math.isfinite(own) and own > 0.1):
                    iv_why.append(f"{tgt}'s own direction barely moves it (NIE {own:.2f}): intervention inconclusive")
                elif not tr >= 0.75 * own:
                    iv_bad = True
                    iv_why.append(f"{src}'s direction moves {tgt} by NIE {tr:.2f} < 0.75 x own {own:.2f}")
            detail += iv_why
            detail.append(
                f"NIE on {b}: own {nm[b][b]:.2f}, {a}'s {nm[b][a]:.2f}; on {a}: own {nm[a][a]:.2f}, {b}'s {nm[a][b]:.2f}"
            )
            if verdict == "agrees" and iv_bad:
                verdict = "disagrees"
                reason += "; but " + next(w for w in iv_why if "< 0.75" in w)
            elif verdict == "agrees" and iv_why:
                verdict = "inconclusive"
                reason += "; but the intervention cannot be measured: " + iv_why[0]
        detail.append(
            f"criteria: own probes >= {settings.min_probe_acc:g} with interval above {0.5 + settings.chance_margin:g}; "
            f"cosine interval above the null's {settings.null_quantile:g} quantile and cosine >= ceiling - "
            f"{settings.ceiling_tolerance:g} (disagrees: interval below the null); transferred probe within 0.05 of own, "
            f"clean gap >= {settings.min_gap:g}, transferred NIE >= 0.75 x own"
        )
        out.append(Finding("truth direction shared across models", f"{a} vs {b}", fig, verdict,
                           f"{verdict}: {reason}; " + "; ".join(detail), reason=reason, interval=(lo, hi),
                           controls=controls_out))
    return out


def _figures(res: xr.Dataset, iv: xr.Dataset | None, out_dir: Path, settings: TruthSettings) -> dict[str, Path]:
    from mechdiff.analyses.plotting import MODEL_COLORS, new_figure, save_figure

    figs: dict[str, Path] = {}
    names = [str(n) for n in res["model"].values]
    layers = res["layer"].values
    color = {n: MODEL_COLORS[i % len(MODEL_COLORS)] for i, n in enumerate(names)}

    fig, ax = new_figure()
    for i, p in enumerate(res["pair"].values):
        for pos, ls in ((settings.probe_position, "-"), (-3 - settings.probe_position, ":")):
            if pos in res["position"].values:
                ax.plot(layers, res["cosine"].sel(pair=p, position=pos), ls, color=MODEL_COLORS[(i + 1) % len(MODEL_COLORS)],
                        marker="o" if ls == "-" else None, label=f"{p} (position {pos})")
        ax.plot(layers, res["null_cosine"].sel(pair=p), "--", color="grey", label=f"{p} (labels shuffled)")
    ax.set_xticks(layers)
    ax.set_xlabel("layer"); ax.set_ylabel("cosine"); ax.set_ylim(-0.05, 1.05)
    ax.set_title("truth direction: cosine between models"); ax.legend(fontsize=7)
    figs["cosine_by_layer"] = save_figure(fig, out_dir / "cosine_by_layer.png")

    fig, ax = new_figure()
    acc = res["transfer_acc"].mean("fold")
    for n in names:
        ax.plot(layers, acc.sel(source=n, target=n, mode="unrefit"), "-o", color=color[n], label=f"{n}: held-out topic")
        ax.plot(layers, res["val_acc"].sel(model=n).mean("fold"), "--", color=color[n], alpha=0.6, label=f"{n}: validation")
        for m in names:
            if m != n:
                ax.plot(layers, acc.sel(source=m, target=n, mode="refit"), ":", color=color[m], label=f"{m} dir on {n} (refit)")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xticks(layers)
    ax.set_xlabel("layer"); ax.set_ylabel("accuracy"); ax.set_ylim(0.4, 1.02)
    ax.set_title("truth probe accuracy"); ax.legend(fontsize=6)
    figs["probe_accuracy"] = save_figure(fig, out_dir / "probe_accuracy_by_layer.png")

    best = {n: int(res["best_layer"].sel(model=n)) for n in names}
    fig, axes = new_figure(width=3.6, ncols=2)
    for ax, mode in zip(axes, ("unrefit", "refit")):
        m = np.array([[float(acc.sel(source=s, target=t, mode=mode, layer=best[s])) for t in names] for s in names])
        _heatmap(ax, m, names, names, vmin=0.5, vmax=1.0)
        ax.set_xlabel("activations of"); ax.set_ylabel("direction of (its best layer)")
        ax.set_title(f"probe transfer ({mode} threshold)", fontsize=9)
    figs["transfer_table"] = save_figure(fig, out_dir / "transfer_table.png")

    if iv is not None:
        fig, ax = new_figure(width=4.0)
        m = iv["nie"].sel(kind="mean").mean("fold").values  # target, source
        _heatmap(ax, m, names, names, vmin=min(0.0, float(np.nanmin(m))), vmax=max(1.0, float(np.nanmax(m))))
        ax.set_xlabel("direction of"); ax.set_ylabel("intervened model")
        ax.set_title(f"NIE (coef {settings.coef:g})", fontsize=9)
        figs["nie_table"] = save_figure(fig, out_dir / "nie_table.png")
    return figs


def _pca(stores: Mapping[str, xr.Dataset], res: xr.Dataset, data: TruthData, settings: TruthSettings, layer: int,
         path: Path) -> Path:
    """The paper's Figure 1b/c: each model's statements at ``layer`` on its first two principal components, with
    its truth direction (as fitted by the study: training rows, centred when the study centres)."""
    from mechdiff.analyses.plotting import pca_figure

    import dask

    names = [str(n) for n in res["model"].values]
    n = len(data.labels)
    # the SVD needs its rows in memory: at most PCA_MAX_ROWS statements, a seeded sample (sorted) when there are more
    rows = np.arange(n) if n <= PCA_MAX_ROWS else np.sort(
        np.random.default_rng(settings.seed + 17).choice(n, size=PCA_MAX_ROWS, replace=False))
    got = dask.compute(*[_rows_at(stores[m], layer, data, settings)[rows] for m in names])
    acts = {m: np.asarray(x) for m, x in zip(names, got)}
    keep = np.all([np.isfinite(x).all(axis=1) for x in acts.values()], axis=0)  # a statement too short for the slot
    acts = {m: x[keep] for m, x in acts.items()}
    dirs = {m: res["direction"].sel(model=m, layer=layer, position=settings.probe_position).values for m in names}
    sample = "" if rows.size == n else f" ({rows.size} of {n} statements, seeded sample)"
    return pca_figure(acts, data.labels[rows][keep], path,
                      title=f"truth directions: layer {layer}, position {settings.probe_position}{sample}",
                      class_names=("false", "true"), directions=dirs)


def _heatmap(ax, m: np.ndarray, rows: list[str], cols: list[str], *, vmin: float, vmax: float) -> None:
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols); ax.set_yticks(range(len(rows)), rows)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] < (vmin + vmax) / 2 else "black", fontsize=8)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def truthfulness_study(
    stores: Mapping[str, xr.Dataset],
    models: Mapping[str, Any] | None,
    out_dir: str | Path,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    shots: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    settings: TruthSettings = TruthSettings(),
    save: bool = True,
) -> StudyResult:
    """The whole study from opened stores (label -> Dataset) and loaded models (label -> LoadedModel; None or
    ``settings.intervene=False`` skips the intervention). Writes its figures to ``out_dir/truthfulness/`` and,
    with ``save``, results.zarr and summary.json; returns the :class:`StudyResult`."""
    res, data = probe_analysis(stores, settings, pairs=pairs, shots=shots)
    settings = replace(settings, probe_position=int(res.attrs["probe_position"]))
    iv = None
    if settings.intervene and models:
        iv = intervention_analysis(models, res, data, settings)
    summ = _summary(res, iv, settings)
    summ["probe_position_val_acc"] = json.loads(res.attrs["probe_position_val_acc"])
    controls = truth_controls(stores, res, data, settings)
    summ["controls"] = {
        p: {k: v for k, v in c.items() if k not in ("bootstrap",)} for p, c in controls.items()
    }
    d = Path(out_dir) / STUDY
    d.mkdir(parents=True, exist_ok=True)
    figs = _figures(res, iv, d, settings)
    pca_layer = int(res["best_layer"].sel(model=res["pair_a"].values[0]))
    figs["pca"] = _pca(stores, res, data, settings, pca_layer, d / "pca.png")
    data_ds = res if iv is None else xr.merge([res, iv.rename({"label": "statement_label"})], combine_attrs="no_conflicts")
    data_ds.attrs.update(res.attrs)
    if iv is not None:
        data_ds.attrs.update(iv.attrs)
    # unicode coords as object arrays: zarr v3 stores those with its stable variable-length string dtype
    data_ds = data_ds.assign_coords({k: data_ds[k].astype(object) for k in data_ds.coords if data_ds[k].dtype.kind == "U"})
    notes = {
        "cosine_by_layer": "Cosine between the models' truth directions per layer (solid: the period, dotted: the token "
        "before it); the grey dashed line is the same with labels shuffled, the similarity shared noise alone gives.",
        "probe_accuracy": "Accuracy of a 1-D probe on the held-out topic per layer (solid), on held-out subjects of the "
        "training topics (dashed, chooses the best layer), and of the other model's direction with a refitted "
        "threshold (dotted); 0.5 is chance.",
        "transfer_table": "Held-out-topic accuracy of each model's direction (rows, at its best layer) on each model's "
        "activations (columns), with the source's threshold (left) and a threshold refitted on the target (right).",
        "nie_table": "Normalised intervention effect on P(TRUE)-P(FALSE) when the row model is steered with the column "
        "model's direction: 1 = statements moved to the other label's mean, 0 = no change.",
        "pca": f"Every statement at layer {pca_layer} (position {settings.probe_position}"
        + (", each topic centred on its mean" if settings.center_by_topic else "")
        + ") on each model's own first two principal components, true and false coloured; the arrow is the model's truth "
        "direction projected into that plane, from the false statements' mean: two clouds split along the arrow are a "
        "linear truth direction, and similar pictures in both panels a shared one.",
    }
    data_ds["null_cosine_samples"] = (("pair", "null_sample"), np.stack([controls[str(p)]["null"] for p in res["pair"].values]))
    data_ds["bootstrap_cosine"] = (("pair", "bootstrap"), np.stack([controls[str(p)]["bootstrap"] for p in res["pair"].values]))
    result = StudyResult(STUDY, data_ds, summ, figs, _findings(res, iv, summ, settings, controls),
                         notes={k: v for k, v in notes.items() if k in figs})
    if save:
        result.save(out_dir)
    return result


def run_truthfulness(
    group: ModelGroup,
    statements: Any,
    out_dir: str | Path,
    *,
    store: str | Path | None = None,
    shots: Mapping[str, Sequence[tuple[str, int]]] | str | Path | None = None,
    settings: TruthSettings = TruthSettings(),
    device: str = "cpu",
    model_dtype: str = "float32",
    store_dtype: str | None = None,
    shard_size: int = 256,
    token_budget: int | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> StudyResult:
    """The study on its own: extract what it needs (resumable: finished shards are kept) into ``store``
    (default ``out_dir/store.zarr``, groups ``<label>/truth``), run it and write its results.
    ``store_dtype`` overrides ``settings.store_dtype``."""
    from mechdiff.analyses.study import StudyContext, run_study

    if store_dtype is not None:
        settings = replace(settings, store_dtype=store_dtype)
    ctx = StudyContext(group, {"statements": statements, "shots": shots}, Path(out_dir), device=device,
                       model_dtype=model_dtype, progress=progress,
                       load_options={"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
    return run_study(study, settings, ctx, store=str(store) if store is not None else None, shard_size=shard_size,
                     token_budget=token_budget)


def _requirements(settings: TruthSettings, group: ModelGroup, datasets: Mapping[str, Any]) -> list[CaptureRequirement]:
    """Each model's statements at the study's site, every layer, the last two tokens, as written."""
    from mechdiff.engine.capture import CaptureSpec

    prompts, _ = load_statements(datasets.get("statements"), shots=datasets.get("shots"))
    if "label" not in prompts.columns or "topic" not in prompts.columns:
        raise ValueError(f"{STUDY}: statements need label and topic columns (have {sorted(prompts.columns)})")
    spec = CaptureSpec(sites=(settings.site,), layers="all", positions=POSITIONS, template="none",
                       dtype=settings.store_dtype)
    return [CaptureRequirement(STUDY, label, "statements", spec, "truth", prompts) for label in group.labels]


def _run(ctx: StudyContext, settings: TruthSettings) -> StudyResult:
    reqs = ctx.requirements(study, settings)
    _, shot_map = load_statements(ctx.dataset("statements", STUDY), shots=ctx.datasets.get("shots"))
    stores = {r.model: ctx.store(r) for r in reqs}
    models = ctx.all_models() if settings.intervene else None
    return truthfulness_study(stores, models, ctx.out, pairs=ctx.group.pairs, shots=shot_map,
                              settings=replace(settings), save=False)


def _check(settings: TruthSettings, group: ModelGroup, datasets: Mapping[str, Any],
           layers: Mapping[str, int]) -> None:
    """Layers every model of the group has, and held-out topics the statements have."""
    for label, n in layers.items():
        if settings.probe_layer is not None and not settings.probe_layer < n:
            raise TruthSettingsError(f"probe_layer {settings.probe_layer}: model {label!r} has layers 0..{n - 1}")
        bad = [x for x in settings.iv_layers or () if not 0 <= x < n]
        if bad:
            raise TruthSettingsError(f"iv_layers: layer {bad[0]} is out of range; model {label!r} has layers 0..{n - 1}")
    if settings.heldout_topics and datasets.get("statements") is not None:
        statements, _ = load_statements(datasets["statements"], shots=datasets.get("shots"))
        have = sorted(set(str(t) for t in statements.columns["topic"]))
        miss = [t for t in settings.heldout_topics if t not in have]
        if miss:
            raise TruthSettingsError(f"heldout_topics {','.join(miss)}: not among the statements' topics {have}")


study = StudyDef(
    name=STUDY, Config=TruthSettings, datasets=("statements", "shots"), requirements=_requirements, run=_run,
    describe="linear truth directions per layer, their similarity across models, probe and intervention transfer",
    check=_check,
)
