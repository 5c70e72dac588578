"""Knowledge storage: activation patching of true/false statement pairs over layer x token position.

For a pair of prompts that differ only in one span ("The city of Paris is in France/Spain. This statement
is:", or, the paper's design, the same object with another subject: "The city of Paris/Tokyo is in France."),
the false prompt is run with one activation -- site ``s`` at layer ``l``, token position ``p`` -- replaced by
the true prompt's. The readout at the last token is ``logit(TRUE) - logit(FALSE)`` (LD) and ``P(TRUE) - P(FALSE)``
(PD); the effect is normalised per pair (``normalisation``):

- ``"logit"`` (default): ``(LD_patched - LD_false) / (LD_true - LD_false)``: 0 = the false run, 1 = the true run;
- ``"paper"`` (Du et al. 2025): ``(PD_patched - PD_false) / (1 - PD_false)``: 0 = the false run, 1 = certainty
  of TRUE. Its mirror, for false activations patched into the true run, is ``(PD_patched - PD_true) / (-1 -
  PD_true)`` (:func:`paper_nie` with ``into="true"``).

Cross-model patching takes the true-prompt activations from model A and patches them into model B's false run
(normalised with B's own runs); the study runs it both ways (base -> post and post -> base).

The patching runs in the engine (:mod:`mechdiff.engine.patching`): :func:`~mechdiff.engine.patching.exact_patching`
(batched, resuming the decoder blocks from cached residual streams, only the suffix after the patched position
recomputed), :func:`~mechdiff.engine.patching.naive_patching` (the reference: one hand-hooked forward per variant)
and :func:`~mechdiff.engine.patching.attribution_patching` (the fast estimates), judged against exact patching in
every run. :class:`PatchingPairs` are the engine's pairs with the study's labels (roles, topics, designs);
:func:`normalise` puts a run's effect on the study's scale.

Positions are stored right-aligned (``position`` = -n .. -1, counted from each prompt's end) and grouped by
role. Where the pairs file names the spans (a ``subject`` column and a ``true_object`` / ``false_object`` or
``object`` column, :data:`SPAN_COLUMNS`), the roles are those spans: ``context`` (before the statement, e.g.
few-shot examples), ``subject``, ``object``, ``final`` (everything after the object) and ``other`` (the
statement's remaining tokens, "The city of", "is in"). Otherwise they are derived from the differing span:
``subject`` = the statement's tokens before it, ``object`` = the span itself, ``final`` = everything after it.
:func:`slot_heatmaps` aligns pairs of different lengths on role slots for dataset statistics; the controls and
the verdict over those heatmaps are in :mod:`mechdiff.analyses.knowledge_maps`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from mechdiff.errors import MechdiffError
from mechdiff.analyses.attribution import attribution_agreement
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult
from mechdiff.analyses.study import StudyContext, StudyDef
from mechdiff.analyses.prompts import truth_prompt
from mechdiff.analyses.knowledge_maps import (
    KnowledgeControls,
    binned_difference,
    compare_maps,
    knowledge_verdict,
    max_abs_by_role,
    mean_maps,
    pearson,
    separation,
    transfer_check,
)
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.patching import (
    ATTRIBUTION_METHODS,
    AttributionError,
    ModelMismatchError,
    PatchPairs,
    attribution_patching,
    check_patchable,
    exact_patching,
    resolve_sites,
)
from mechdiff.engine.sites import parse_layers
from mechdiff.engine.tokens import TokenError, answer_token, first_token_of, word_tokens

__all__ = [
    "PAIR_COLUMNS",
    "SPAN_COLUMNS",
    "POSITIONS",
    "ROLES",
    "NORMALISATIONS",
    "PairError",
    "KnowledgeOptionError",
    "PatchingPairs",
    "load_pairs",
    "load_shots",
    "prepare_pairs",
    "normalise",
    "normalised_effect",
    "paper_nie",
    "slot_heatmaps",
    "heatmap_stats",
    "compare_heatmaps",
    "pearson",
    "KnowledgeControls",
    "knowledge_verdict",
    "run_knowledge",
]

log = logging.getLogger(__name__)

PAIR_COLUMNS: tuple[str, ...] = ("true_statement", "false_statement", "true_answer", "false_answer", "topic")
#: Columns naming the spans of a pair (role -> columns, searched in the true statement, then the false one).
SPAN_COLUMNS: dict[str, tuple[str, ...]] = {
    "subject": ("subject", "true_subject", "false_subject"),
    "object": ("object", "true_object", "false_object"),
}
# "other" last: the role codes of the first four stay what they were
ROLES: tuple[str, ...] = ("context", "subject", "object", "final", "other")
_PAD_ROLE = -1
_MEAN_ROLES = ("context", "other")  # one slot each: the mean over their tokens
#: ``normalisation`` of the patching effect: see the module docstring.
NORMALISATIONS: tuple[str, ...] = ("logit", "paper")
#: ``positions`` patched: every token, or the statement's (the context before it left alone).
POSITIONS: tuple[str, ...] = ("statement", "all")


class PairError(MechdiffError, ValueError):
    """A patching pair that cannot be used (unequal token lengths, identical prompts, bad answers, ...)."""


class KnowledgeOptionError(MechdiffError, ValueError):
    """An option of the knowledge study that cannot be used (a normalisation, a control model, ...)."""


# =============================================================================================
# inputs


def load_pairs(source: str | Path | pd.DataFrame, *, limit: int | None = None) -> pd.DataFrame:
    """Read and check a pairs file (CSV with :data:`PAIR_COLUMNS`; extra columns are kept).

    ``limit`` keeps at most that many pairs, taken round-robin over topics in file order (over topic x
    ``changed`` where the file has a ``changed`` column, e.g. subject / object), so a small sample still covers
    every topic and both pair designs.
    """
    if isinstance(source, pd.DataFrame):
        df, name = source.reset_index(drop=True), "pairs"
    else:
        path = Path(source)
        if not path.is_file():
            raise PairError(f"pairs file {str(path)!r} does not exist")
        # dtype=str: pandas would otherwise read the answers TRUE / FALSE as booleans ("True")
        df, name = pd.read_csv(path, keep_default_na=False, dtype=str), str(path)
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise PairError(f"{name}: missing column(s) {', '.join(missing)}; a pairs file needs {', '.join(PAIR_COLUMNS)}")
    if len(df) == 0:
        raise PairError(f"{name} has no pairs")
    for c in PAIR_COLUMNS[:4]:
        empty = [i for i, v in enumerate(df[c]) if not str(v).strip()]
        if empty:
            raise PairError(f"{name}: row {empty[0] + 1} has an empty {c!r}")
    df = df.astype({c: str for c in PAIR_COLUMNS})
    if limit is not None and limit < len(df):
        if limit < 1:
            raise PairError(f"limit must be at least 1, got {limit}")
        df = df.assign(_rank=df.groupby("topic", sort=False).cumcount())  # rank within topic
        if "changed" in df.columns:  # within a topic, the designs take turns
            turn = df.groupby(["topic", "changed"], sort=False).cumcount()
            df = df.assign(_turn=turn).sort_values("_turn", kind="stable")
            df = df.assign(_rank=df.groupby("topic", sort=False).cumcount()).drop(columns="_turn").sort_index()
        df = df.sort_values(["_rank"], kind="stable").head(limit)
        df = df.sort_index().drop(columns="_rank").reset_index(drop=True)
    return df


def load_shots(path: str | Path) -> dict[str, list[tuple[str, int]]]:
    """A ``shots.json`` (topic -> [[statement, label], ...]) as used by the zoo's few-shot prompts."""
    raw = json.loads(Path(path).read_text())
    return {t: [(str(s), int(label)) for s, label in v] for t, v in raw.items()}


@dataclass(kw_only=True)
class PatchingPairs(PatchPairs):
    """Tokenised pairs, ready for patching: the engine's :class:`~mechdiff.engine.patching.PatchPairs` (per pair
    equal-length token ids, the (true answer, false answer) tokens) with the study's labels: per token its role,
    per pair its topic, prompts and design. The patching results carry the labels (:meth:`coords`)."""

    roles: list[np.ndarray]  # per pair, per token: index into ROLES
    topics: np.ndarray
    true_prompts: list[str]
    false_prompts: list[str]
    changed: np.ndarray | None = None  # per pair: which span differs (the ``changed`` column, or from the spans)

    def subset(self, idx: Sequence[int]) -> "PatchingPairs":
        idx = list(idx)
        return PatchingPairs(
            true_ids=[self.true_ids[i] for i in idx], false_ids=[self.false_ids[i] for i in idx],
            answers=self.answers[idx], tokenizer_hash=self.tokenizer_hash, roles=[self.roles[i] for i in idx],
            topics=self.topics[idx], true_prompts=[self.true_prompts[i] for i in idx],
            false_prompts=[self.false_prompts[i] for i in idx],
            changed=None if self.changed is None else self.changed[idx],
        )

    def mask(self, positions: str = "all") -> list[np.ndarray]:
        """Per pair, the token positions to patch: ``all``, or ``statement`` (all but the context role: the
        few-shot examples before the statement, which a within-model patch cannot change anyway)."""
        if positions == "all":
            return [np.ones(len(r), dtype=bool) for r in self.roles]
        if positions == "statement":
            return [r != ROLES.index("context") for r in self.roles]
        raise KnowledgeOptionError(f"positions {positions!r}: one of {', '.join(POSITIONS)}")

    def coords(self) -> dict[str, Any]:
        out: dict[str, Any] = {"topic": ("pair", np.asarray(self.topics, dtype=str)),
                               "role": (("pair", "position"), self.role_matrix())}
        if self.changed is not None:
            out["changed"] = ("pair", np.asarray(self.changed, dtype=str))
        return out

    def role_matrix(self) -> np.ndarray:
        """[pair, position] role codes, right-aligned like the results (-1 = no token there)."""
        t = int(self.lengths.max())
        out = np.full((len(self), t), _PAD_ROLE, dtype=np.int8)
        for i, r in enumerate(self.roles):
            out[i, t - len(r) :] = r
        return out


def _prompt(statement: str, topic: str, shots: Mapping[str, Sequence[tuple[str, int]]] | None) -> str:
    return truth_prompt(statement, (shots or {}).get(topic, ()))


def _answer_token(tokenizer, prompt: str, prompt_ids: list[int], answer: str, where: str) -> int:
    """The first token the answer adds after the prompt (so word-boundary handling follows the tokenizer)."""
    try:
        return answer_token(tokenizer, prompt, prompt_ids, answer)
    except TokenError as e:
        raise PairError(f"{where}: {e}") from None


def _span_columns(df: pd.DataFrame) -> dict[str, list[str]] | None:
    """The :data:`SPAN_COLUMNS` the file has, per role; None unless it names both a subject and an object."""
    cols = {role: [c for c in names if c in df.columns] for role, names in SPAN_COLUMNS.items()}
    return cols if all(cols.values()) else None


def _span_tokens(tokenizer, prompts: Sequence[str], statements: Sequence[str], ids: Sequence[list[int]],
                 texts: Sequence[str], last: bool) -> np.ndarray | None:
    """Token indices of the first of ``texts`` found in a statement (the true one, then the false one: equal
    token lengths make the positions the same in both); empty if none is found, None if the tokenizer has no
    character offsets."""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        for prompt, statement, tok_ids in zip(prompts, statements, ids):
            hit = word_tokens(tokenizer, prompt, tok_ids, text, within=statement, last=last)
            if hit is None or hit.size:
                return hit
    return np.zeros(0, dtype=np.int64)


def _roles_from_spans(n: int, start: int, subject: np.ndarray, obj: np.ndarray) -> np.ndarray:
    r = np.full(n, ROLES.index("other"), dtype=np.int8)
    r[int(obj.max()) + 1 :] = ROLES.index("final")
    r[:start] = ROLES.index("context")
    r[subject] = ROLES.index("subject")
    r[obj] = ROLES.index("object")
    return r


def _changed_span(diff: np.ndarray, subject: np.ndarray, obj: np.ndarray) -> str:
    d = set(diff.tolist())
    return "subject" if d <= set(subject.tolist()) else "object" if d <= set(obj.tolist()) else "other"


def _roles(n: int, start: int, diff: np.ndarray) -> np.ndarray:
    lo, hi = int(diff.min()), int(diff.max())
    r = np.full(n, ROLES.index("final"), dtype=np.int8)
    r[:lo] = ROLES.index("subject")
    r[: min(start, lo)] = ROLES.index("context")
    r[lo : hi + 1] = ROLES.index("object")
    return r


def prepare_pairs(
    tokenizer,
    pairs: pd.DataFrame,
    *,
    shots: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    prompt: Callable[[str, str], str] | None = None,
    max_length: int | None = None,
    tokenizer_hash: str = "",
) -> PatchingPairs:
    """Build the "<shots> <statement> This statement is:" prompts and tokenise them.

    ``shots`` maps topic -> few-shot (statement, label) examples (the zoo's ``shots.json``); topics without
    shots get a zero-shot prompt. ``prompt(statement, topic)`` replaces the prompt builder entirely.
    Roles come from the file's :data:`SPAN_COLUMNS` when it names a subject and an object (a tokenizer without
    character offsets falls back to the differing span), else from the differing span (module docstring).
    Raises :class:`PairError` naming the rows whose prompts differ in token length, tokenise identically, whose
    answers are unusable, or whose named spans are not in the statements, before any model runs (rows counted
    from 1, the first data row of a CSV).
    """
    df = load_pairs(pairs)
    build = prompt or (lambda s, t: _prompt(s, t, shots))
    tp = [build(s, t) for s, t in zip(df["true_statement"], df["topic"])]
    fp = [build(s, t) for s, t in zip(df["false_statement"], df["topic"])]
    t_ids = tokenizer(tp)["input_ids"]
    f_ids = tokenizer(fp)["input_ids"]
    bad = [(i, len(a), len(b)) for i, (a, b) in enumerate(zip(t_ids, f_ids)) if len(a) != len(b)]
    if bad:
        i, a, b = bad[0]
        more = ""
        if len(bad) > 1:
            rows = ", ".join(str(x[0] + 1) for x in bad[1:6]) + ("..." if len(bad) > 6 else "")
            more = f" (and {len(bad) - 1} more: rows {rows})"
        raise PairError(
            f"pair row {i + 1}: the true prompt has {a} tokens, the false prompt {b} "
            f"({df['true_statement'][i]!r} vs {df['false_statement'][i]!r}){more}; patching needs pairs of equal "
            "token length: change only a span that tokenizes to the same number of tokens"
        )
    if max_length is not None:
        long = [i for i, a in enumerate(t_ids) if len(a) > max_length]
        if long:
            raise PairError(
                f"pair row {long[0] + 1}: {len(t_ids[long[0]])} tokens, more than the model's context of {max_length}"
            )
    spans = _span_columns(df)
    roles, answers, changed = [], [], []
    for i, (a, b) in enumerate(zip(t_ids, f_ids)):
        diff = np.nonzero(np.asarray(a) != np.asarray(b))[0]
        if len(diff) == 0:
            raise PairError(
                f"pair row {i + 1}: the true and false prompts tokenize identically ({df['true_statement'][i]!r})"
            )
        start = first_token_of(tokenizer, tp[i], df["true_statement"][i], a)
        found = _pair_spans(tokenizer, df, i, (tp[i], fp[i]), (a, b), spans) if spans else None
        if found is None:
            roles.append(_roles(len(a), start, diff))
            changed.append(str(df["changed"][i]) if "changed" in df.columns else "")
        else:
            roles.append(_roles_from_spans(len(a), start, *found))
            changed.append(str(df["changed"][i]) if "changed" in df.columns else _changed_span(diff, *found))
        at = _answer_token(tokenizer, tp[i], a, df["true_answer"][i], f"pair row {i + 1}")
        af = _answer_token(tokenizer, fp[i], b, df["false_answer"][i], f"pair row {i + 1}")
        if at == af:
            raise PairError(
                f"pair row {i + 1}: answers {df['true_answer'][i]!r} and {df['false_answer'][i]!r} map to the same "
                f"token {at}"
            )
        answers.append((at, af))
    return PatchingPairs(
        true_ids=[list(x) for x in t_ids], false_ids=[list(x) for x in f_ids],
        answers=np.asarray(answers, dtype=np.int64), tokenizer_hash=tokenizer_hash, roles=roles,
        topics=df["topic"].to_numpy(dtype=object), true_prompts=tp, false_prompts=fp,
        changed=np.asarray(changed, dtype=object),
    )


def _pair_spans(tokenizer, df: pd.DataFrame, i: int, prompts: tuple[str, str], ids: tuple[list[int], list[int]],
                cols: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(subject, object) token indices of pair ``i`` from the span columns; None if the tokenizer has no offsets."""
    statements = (df["true_statement"][i], df["false_statement"][i])
    out = []
    for role, last in (("subject", False), ("object", True)):  # subjects come first, objects last
        tok = _span_tokens(tokenizer, prompts, statements, ids, [str(df[c][i]) for c in cols[role]], last)
        if tok is None:
            log.warning("knowledge: the tokenizer gives no character offsets; roles from the differing span")
            return None
        if tok.size == 0:
            raise PairError(f"pair row {i + 1}: no {role} span ({', '.join(repr(str(df[c][i])) for c in cols[role])} "
                            f"in column(s) {', '.join(cols[role])}) in {statements[0]!r} or {statements[1]!r}")
        out.append(tok)
    if np.intersect1d(*out).size:
        raise PairError(f"pair row {i + 1}: the subject and object spans overlap in {statements[0]!r}")
    return out[0], out[1]


# =============================================================================================
# patching readouts


def paper_nie(pd_patched: Any, pd_run: Any, *, into: str = "false") -> Any:
    """The paper's normalised indirect effect from P(TRUE) - P(FALSE) readouts: for true activations patched
    into the false run (``into="false"``, what the sweeps do) ``(PD_patched - PD_false) / (1 - PD_false)``; for
    false activations patched into the true run (``into="true"``) ``(PD_patched - PD_true) / (-1 - PD_true)``.
    ``pd_run``: the readout of the run patched into. 0 = that run unchanged, 1 = certainty of the other label."""
    if into not in ("false", "true"):
        raise KnowledgeOptionError(f"into {into!r}: false (true activations into the false run) or true")
    toward = 1.0 if into == "false" else -1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (pd_patched - pd_run) / (toward - pd_run)


def normalised_effect(patched: Any, true_run: Any, false_run: Any, normalisation: str = "logit") -> Any:
    """The patching effect of true activations in the false run, from readouts of the patched, true and false
    runs (logit differences for ``"logit"``, probability differences for ``"paper"``; see the module docstring)."""
    if normalisation == "paper":
        return paper_nie(patched, false_run)
    if normalisation != "logit":
        raise KnowledgeOptionError(f"normalisation {normalisation!r}: one of {', '.join(NORMALISATIONS)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return (patched - false_run) / (true_run - false_run)



def normalise(ds: xr.Dataset, normalisation: str = "logit") -> xr.Dataset:
    """A patching result (:func:`~mechdiff.engine.patching.exact_patching`, ``naive_patching`` or
    ``attribution_patching``) with ``effect`` on the scale ``normalisation`` names (module docstring): ``logit``
    keeps the engine's, ``paper`` recomputes it from the probability readouts (exact or naive patching only)."""
    if normalisation not in NORMALISATIONS:
        raise KnowledgeOptionError(f"normalisation {normalisation!r}: one of {', '.join(NORMALISATIONS)}")
    if normalisation == "paper":
        if "patched_pd" not in ds:
            raise KnowledgeOptionError(f"{ds.attrs.get('method', 'this')} patching has no probability readout: "
                                       "normalisation 'paper' needs exact or naive patching")
        ds = ds.assign(effect=normalised_effect(ds["patched_pd"], ds["pd_true"], ds["pd_false"], "paper"))
    else:
        ds = ds.assign(effect=normalised_effect(ds["patched"], ds["ld_true"], ds["ld_false"]))
    ds.attrs = {**ds.attrs, "normalisation": normalisation}
    return ds


# =============================================================================================
# statistics over a dataset


def _slot_spec(roles: np.ndarray, n_subject: int, n_object: int, n_final: int | None,
               other: bool | None = None) -> list[tuple[str, str, int]]:
    """(label, role, k): context (mean over its tokens), other (mean over its tokens; where ``other``, default:
    where any pair has such tokens), the last ``n_subject`` subject tokens, the first ``n_object`` object tokens,
    the last ``n_final`` tokens of the prompt (default: the longest final span, at most 8)."""
    if n_final is None:
        fin = (roles == ROLES.index("final")).sum(axis=1)
        n_final = int(min(8, max(1, fin.max() if fin.size else 1)))
    if other is None:
        other = bool((roles == ROLES.index("other")).any())
    spec = [("context", "context", 0)] + ([("other", "other", 0)] if other else [])
    spec += [(f"subject[{k}]", "subject", k) for k in range(-n_subject, 0)]
    spec += [(f"object[{k}]", "object", k) for k in range(n_object)]
    spec += [(f"final[{k}]", "final", k) for k in range(-n_final, 0)]
    return spec


def slot_heatmaps(
    effect: xr.DataArray,
    *,
    n_subject: int = 3,
    n_object: int = 2,
    n_final: int | None = None,
    other: bool | None = None,
) -> xr.DataArray:
    """Align per-pair heatmaps (``effect`` with dims (..., pair, layer, position) and a ``role`` coord
    (pair, position)) on role slots: dims (..., pair, layer, slot), NaN where a pair lacks a slot. ``other``:
    whether to have the ``other`` slot (default: where any pair has ``other`` tokens)."""
    roles = np.asarray(effect["role"].values)
    spec = _slot_spec(roles, n_subject, n_object, n_final, other)
    v = np.moveaxis(effect.transpose(..., "pair", "layer", "position").values, -3, 0)  # [pair, ..., layer, pos]
    out = np.full(v.shape[:-1] + (len(spec),), np.nan)
    for i in range(v.shape[0]):
        r = roles[i]
        where = {name: np.nonzero(r == c)[0] for c, name in enumerate(ROLES)}
        for j, (_, role, k) in enumerate(spec):
            pos = where[role]
            if role in _MEAN_ROLES:
                if len(pos):
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # unpatched context: all NaN
                        out[i, ..., j] = np.nanmean(v[i][..., pos], axis=-1)
                continue
            if role == "final":
                # counted from the prompt's end, whatever the final span's length
                valid = np.nonzero(r != _PAD_ROLE)[0]
                p = valid[k] if -k <= len(valid) and r[valid[k]] == ROLES.index("final") else None
            else:
                p = pos[k] if -len(pos) <= k < len(pos) else None
            if p is not None:
                out[i, ..., j] = v[i][..., p]
    out = np.moveaxis(out, 0, -3)
    dims = tuple(d for d in effect.transpose(..., "pair", "layer", "position").dims
                 if d not in ("pair", "layer", "position"))
    coords = {d: effect[d].values for d in dims if d in effect.coords}
    coords.update(pair=effect["pair"].values, layer=effect["layer"].values, slot=[s[0] for s in spec],
                  slot_role=("slot", [s[1] for s in spec]))
    return xr.DataArray(out, dims=(*dims, "pair", "layer", "slot"), coords=coords, name="effect")


def heatmap_stats(slots: xr.DataArray, keep: xr.DataArray | np.ndarray | None = None) -> xr.Dataset:
    """Mean, standard deviation and count over pairs of slot-aligned heatmaps; ``keep`` (bool over pair, or
    over (..., pair)) selects the pairs that count."""
    x = slots
    if keep is not None:
        k = keep if isinstance(keep, xr.DataArray) else xr.DataArray(np.asarray(keep, bool), dims=("pair",))
        x = x.where(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slots stay NaN
        mean = x.mean("pair", skipna=True)
        std = x.std("pair", skipna=True, ddof=0)
    count = x.notnull().sum("pair")
    return xr.Dataset({"mean": mean, "std": std, "count": count})


def _peak_layers(mean: xr.DataArray) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for role in ROLES:
        m = mean.where(mean["slot_role"] == role, drop=True)
        if m.sizes.get("slot", 0) == 0:
            out[role] = None
            continue
        prof = m.mean("slot", skipna=True).values
        out[role] = int(m["layer"].values[int(np.nanargmax(prof))]) if np.isfinite(prof).any() else None
    return out


def compare_heatmaps(a: xr.DataArray, b: xr.DataArray) -> dict[str, Any]:
    """Two mean heatmaps (layer x slot): correlation, peak layer per role in each, and ``b - a``."""
    return {
        "correlation": pearson(a.values, b.values),
        "peak_layer_a": _peak_layers(a),
        "peak_layer_b": _peak_layers(b),
        "difference": b - a,
    }


# =============================================================================================
# the study


def _pairs_source(pairs: Any) -> tuple[pd.DataFrame, Path | None]:
    if pairs is None:
        # the dataset is the caller's choice (the CLI and the main job pass the embedded one)
        raise PairError("give pairs: a pairs CSV or DataFrame with columns " + ", ".join(PAIR_COLUMNS))
    if isinstance(pairs, pd.DataFrame):
        return load_pairs(pairs), None
    return load_pairs(pairs), Path(pairs)


def _heatmap_figure(stats: xr.Dataset, site: str, panels: list[str],
                    diffs: list[tuple[str, xr.DataArray, Mapping[str, float]]], n_bins: int, path: Path) -> Path:
    """Mean heatmaps of every run side by side, then the binned difference heatmaps (the paper's Figure 1a):
    ``diffs`` holds (title, binned difference [layer, slot], max |difference| per token group)."""
    from matplotlib import colormaps

    from mechdiff.analyses.plotting import new_figure, save_figure

    n = len(panels) + len(diffs)
    fig, axes = new_figure(width=3.6, height=3.4, ncols=n)
    axes = np.atleast_1d(axes)
    mean = stats["mean"].sel(site=site)
    vmax = float(np.nanmax(np.abs(mean.values))) if np.isfinite(mean.values).any() else 1.0
    labels = list(mean["slot"].values)
    for ax, run in zip(axes, panels):
        im = ax.imshow(mean.sel(run=run).values, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(run, fontsize=9)
    for ax, (title, d, peak) in zip(axes[len(panels) :], diffs):
        # one colour per bin step: the paper's 20-bin scale, -1 .. 1 in steps of 1 / n_bins
        cmap = colormaps["PuOr_r"].resampled(2 * n_bins + 1)
        ax.imshow(d.values, aspect="auto", origin="lower", cmap=cmap, vmin=-1 - 0.5 / n_bins, vmax=1 + 0.5 / n_bins)
        groups = ", ".join(f"{r} {v:.2f}" for r, v in peak.items() if np.isfinite(v))
        ax.set_title(f"{title} ({n_bins} bins)\nmax |diff|: {groups}", fontsize=7)
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticks(range(mean.sizes["layer"]))
        ax.set_yticklabels(mean["layer"].values, fontsize=6)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[: len(panels)].tolist(), shrink=0.8, label="normalised patching effect")
    fig.suptitle(f"activation patching, {site} (mean over pairs)", fontsize=10)
    return save_figure(fig, path)


def _attribution_figure(exact: xr.Dataset, attrib: xr.Dataset, runs: list[str], path: Path) -> Path:
    from mechdiff.analyses.plotting import MODEL_COLORS, new_figure, save_figure

    fig, ax = new_figure()
    for i, run in enumerate(runs):
        x = exact["effect"].sel(run=run).values.ravel()
        y = attrib["effect"].sel(run=run).values.ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=4, alpha=0.4, color=MODEL_COLORS[i % len(MODEL_COLORS)],
                   label=f"{run} (r={pearson(x, y):.2f})")
    ax.set_xlabel("exact patching effect")
    ax.set_ylabel("attribution patching estimate")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _load_group(group: ModelGroup, models: Mapping[str, LoadedModel] | None, control_model: str | Path | None,
                device: str, dtype: str) -> tuple[dict[str, LoadedModel], str | None]:
    """The group's models by label (loaded unless given), plus the control model; returns them and its label.
    The control loads first, so a bad one fails before the group's models load."""
    from mechdiff.engine.models import load_model

    models = dict(models) if models is not None else {}
    missing = [lab for lab in group.labels if lab not in models]
    if missing and models:
        raise KnowledgeOptionError(f"no loaded model for label(s) {', '.join(missing)}")
    label = None
    if control_model is not None:
        label = str(control_model) if str(control_model) in models else "control"
        if label in group.labels or str(control_model) in group.models.values():
            raise KnowledgeOptionError(f"control model {str(control_model)!r} is a model of the group; give an "
                                       "unrelated model of the same tokenizer")
        if label not in models:
            models[label] = load_model(control_model, device=device, dtype=dtype)
    for lab in missing:
        models[lab] = load_model(group.models[lab], device=device, dtype=dtype)
    base = models[group.labels[0]]
    if label is not None and models[label].tokenizer_hash != base.tokenizer_hash:
        raise ModelMismatchError(
            f"the control model {models[label].model_id!r} has another tokenizer than {base.model_id!r}: its heatmap "
            "would not align with the base model's token positions; give an unrelated model of the same tokenizer")
    return models, label


def _slot_array(slots: xr.DataArray, run: str, site: str) -> np.ndarray:
    return slots.sel(run=run, site=site).transpose("pair", "layer", "slot").values


def _compare_site(slots: xr.DataArray, keep: xr.DataArray, gap: xr.DataArray, pairs: PatchingPairs, a: str, b: str,
                  site: str, cross: bool, control: str | None, controls: KnowledgeControls) -> dict[str, Any]:
    """The controls of one comparison at one site: base vs post maps, both cross-model runs against the target's
    own, the control model against base, each model's separation, and each pair design's correlation."""
    roles = list(slots["slot_role"].values)
    topics = np.asarray(pairs.topics, dtype=str)

    def x(run: str) -> tuple[np.ndarray, np.ndarray]:
        return _slot_array(slots, run, site), keep.sel(run=run).values

    out: dict[str, Any] = {"maps": compare_maps(*x(a), *x(b), roles, topics, controls)}
    out["separation"] = {m: separation(gap.sel(run=m).values, keep.sel(run=m).values, topics, controls) for m in (a, b)}
    if cross:
        out["cross"] = {f"{s}->{t}": transfer_check(*x(f"{s}->{t}"), *x(t), roles, topics, controls)
                        for s, t in ((a, b), (b, a))}
    if control is not None:
        out["control"] = compare_maps(*x(control), *x(a), roles, topics, controls)
    if pairs.changed is not None:  # each pair design on its own (e.g. subject- vs object-changed pairs)
        design = np.asarray(pairs.changed, dtype=str)
        kinds = [k for k in dict.fromkeys(design.tolist()) if k]
        if len(kinds) > 1:
            (xa, ka), (xb, kb) = x(a), x(b)
            out["by_design"] = {k: {"n_pairs": int((design == k).sum()),
                                    "correlation": pearson(mean_maps(xa, ka & (design == k))[0],
                                                           mean_maps(xb, kb & (design == k))[0])}
                                for k in kinds}
    return out


def _finite_max(values: Any) -> float:
    v = [float(x) for x in values if np.isfinite(x)]
    return max(v) if v else float("nan")


def _verdict_numbers(c: dict[str, Any], a: str, b: str) -> tuple[dict[str, float], dict[str, float]]:
    """(figures, controls) of the finding from one site's comparison."""
    m = c["maps"]
    figs = {"heatmap_correlation": m.correlation}
    ctl = {"null_upper": m.null_upper, "null_mean": m.null_mean, f"reliability_{a}": m.reliability[0],
           f"reliability_{b}": m.reliability[1], "ceiling": m.ceiling}
    for name, x in c.get("cross", {}).items():
        key = "cross" if name == f"{a}->{b}" else "reverse_cross"
        figs[f"{key}_correlation"] = x.comparison.correlation
        figs[f"{key}_transfer"] = x.transfer
        ctl[f"{key}_null_upper"] = x.comparison.null_upper
        ctl[f"{key}_transfer_low"] = x.transfer_interval[0]
    if "control" in c:
        ctl["control_correlation"] = c["control"].correlation
    return figs, ctl


def _check_options(sites: str | Sequence[str], positions: str, normalisation: str, attribution: bool,
                   attribution_method: str) -> None:
    resolve_sites(sites)
    if positions not in POSITIONS:
        raise KnowledgeOptionError(f"positions {positions!r}: one of {', '.join(POSITIONS)}")
    if normalisation not in NORMALISATIONS:
        raise KnowledgeOptionError(f"normalisation {normalisation!r}: one of {', '.join(NORMALISATIONS)}")
    if attribution and attribution_method not in ATTRIBUTION_METHODS:
        raise AttributionError(f"attribution method {attribution_method!r}: one of {', '.join(ATTRIBUTION_METHODS)}")


def run_knowledge(
    group: ModelGroup,
    pairs: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    shots: str | Path | Mapping[str, Sequence[tuple[str, int]]] | None = "auto",
    sites: str | Sequence[str] = ("resid_post", "attn_out", "mlp_out"),
    layers: str | Sequence[int] = "all",
    cross: bool = True,
    attribution: bool = True,
    limit: int | None = None,
    positions: str = "statement",
    min_gap: float | None = 0.1,
    device: str = "cpu",
    dtype: str = "float32",
    token_budget: int = 8192,
    models: Mapping[str, LoadedModel] | None = None,
    normalisation: str = "logit",
    control_model: str | Path | None = None,
    controls: KnowledgeControls = KnowledgeControls(),
    attribution_method: str = "ig",
    save: bool = True,
) -> StudyResult:
    """The knowledge-storage study for a model group (written to ``out_dir`` when ``save``; the study runner
    writes it itself).

    Per model: exact patching heatmaps (and attribution estimates) for every site x layer x position; per
    (base, post) pair: cross-model patching both ways (the base model's true-prompt activations into the post
    model's false runs, and the post model's into the base model's). Statistics over pairs on role slots;
    between models: heatmap correlation with its controls (:func:`~mechdiff.analyses.knowledge_maps.compare_maps`:
    bootstrap interval over pairs, permuted-map null, split-half ceiling), peak layer per role, the difference
    heatmap and the paper's binned one with its largest change per token group; the verdict is
    :func:`~mechdiff.analyses.knowledge_maps.knowledge_verdict` on the ``resid_post`` site (else the first).

    Pairs whose target model does not separate them by more than ``min_gap`` (ld_true - ld_false, in logits) are
    left out of the normalised statistics (None keeps all); ``mean_delta`` holds the un-normalised change of the
    logit difference over every pair. ``positions="statement"`` leaves the context before the statement (the
    few-shot examples) unpatched; ``"all"`` patches it too (within a model those patches are exact no-ops, across
    models they are the bulk of the work). ``normalisation``: ``logit`` or ``paper`` (module docstring).

    ``pairs``: a CSV / DataFrame with :data:`PAIR_COLUMNS` (and optionally :data:`SPAN_COLUMNS` and ``changed``),
    (required). ``shots``: "auto" (a ``shots.json`` next to the pairs file, if any), a
    path, a mapping, or None. ``models``: already loaded models by label (else loaded from ``group``).
    ``control_model``: an unrelated model of the same tokenizer (a path, or a label in ``models``): its own
    heatmap's correlation with base's is the control a "storage unchanged" verdict must clear.
    ``controls``: sizes, seed and thresholds of the controls and the verdict rule. ``attribution_method``: the
    fast estimate (:data:`~mechdiff.engine.patching.ATTRIBUTION_METHODS`; integrated gradients by default, the one that
    tracked exact patching on the embedded pair); its agreement with exact patching is in the summary and the
    report, with a verdict on whether it can stand in for the sweep.
    Writes ``out_dir/knowledge/{results.zarr, summary.json, *.png}``.
    """
    t0 = time.perf_counter()
    _check_options(sites, positions, normalisation, attribution, attribution_method)  # before any model loads
    df, path = _pairs_source(pairs)
    df = load_pairs(df, limit=limit)
    if shots == "auto":
        cand = path.parent / "shots.json" if path is not None else None
        shots = load_shots(cand) if cand is not None and cand.is_file() else None
    elif isinstance(shots, (str, Path)):
        shots = load_shots(shots)
    sites = resolve_sites(sites)
    models, control = _load_group(group, models, control_model, device, dtype)
    labels = list(group.labels) + ([control] if control else [])
    base = labels[0]
    if cross:
        for lab in group.labels[1:]:
            check_patchable(models[base], models[lab])
    prepared: dict[str, PatchingPairs] = {}
    by_tok: dict[str, PatchingPairs] = {}
    for lab in labels:
        lm = models[lab]
        if lm.tokenizer_hash not in by_tok:
            by_tok[lm.tokenizer_hash] = prepare_pairs(
                lm.tokenizer, df, shots=shots, max_length=lm.adapter.max_positions, tokenizer_hash=lm.tokenizer_hash)
        prepared[lab] = by_tok[lm.tokenizer_hash]
    layer_sets = {parse_layers(layers, models[lab].adapter.n_layers) for lab in labels}
    if len(layer_sets) != 1:
        raise ModelMismatchError("the models of the group have different layer counts; choose --layers valid for all")

    runs: list[tuple[str, str, str]] = [(lab, lab, lab) for lab in labels]  # (run name, source, target)
    if cross:
        for lab in group.labels[1:]:
            runs += [(f"{base}->{lab}", base, lab), (f"{lab}->{base}", lab, base)]
    exact_ds, attr_ds, timing = [], [], {}
    for name, s, t in runs:
        src, tgt = models[s], models[t]
        log.info("knowledge: exact patching %s", name)
        mask = prepared[t].mask(positions)
        e = normalise(exact_patching(src, tgt, prepared[t], sites=sites, layers=layers, mask=mask,
                                     token_budget=token_budget), normalisation)
        exact_ds.append(e)
        timing[name] = {"exact_s": e.attrs["seconds"], "execution": e.attrs["execution"],
                        "variants_run": e.attrs["variants_run"], "variants_skipped": e.attrs["variants_skipped"]}
        if attribution:
            a = attribution_patching(src, tgt, prepared[t], sites=sites, layers=layers, mask=mask,
                                     token_budget=token_budget, method=attribution_method)
            attr_ds.append(a)
            attr_signed = bool(a.attrs["signed"])
            timing[name]["attribution_s"] = a.attrs["seconds"]
    names = [r[0] for r in runs]
    run_dim = xr.DataArray(names, dims="run", name="run")

    def stack(dss: list[xr.Dataset]) -> xr.Dataset:
        # roles become a variable: models with different tokenizers have different roles per position
        out = []
        for d in dss:
            role = d["role"].values
            d = d.drop_vars("role").assign(role=(("pair", "position"), role))
            d.attrs = {}
            out.append(d)
        return xr.concat(out, dim=run_dim, join="outer", data_vars="all", coords="minimal", compat="override")

    # one slot layout for every run: the longest final span over all tokenizations (at most 8), and an "other"
    # slot where any tokenization has such tokens
    fin = [int((pp.role_matrix() == ROLES.index("final")).sum(1).max()) for pp in prepared.values()]
    n_final = max(1, min(8, max(fin)))
    other = any((pp.role_matrix() == ROLES.index("other")).any() for pp in prepared.values())
    ex = stack(exact_ds)
    gap = ex["ld_true"] - ex["ld_false"]
    keep = gap > min_gap if min_gap is not None else xr.ones_like(gap, dtype=bool)
    slots = xr.concat([slot_heatmaps(d["effect"], n_final=n_final, other=other) for d in exact_ds], dim=run_dim)
    stats = heatmap_stats(slots, keep)
    # Un-normalised change of the logit difference, over every pair: defined even where a model barely
    # separates a pair (and the normalised effect is not).
    delta = heatmap_stats(xr.concat([slot_heatmaps(d["patched"] - d["ld_false"], n_final=n_final, other=other)
                                     for d in exact_ds], dim=run_dim))
    data = xr.Dataset(
        {
            "effect": ex["effect"],
            "patched": ex["patched"],
            "patched_pd": ex["patched_pd"],
            "ld_true": ex["ld_true"],
            "ld_false": ex["ld_false"],
            "pd_true": ex["pd_true"],
            "pd_false": ex["pd_false"],
            "role": ex["role"].fillna(_PAD_ROLE).astype(np.int8),
            "kept": keep,
            "slot_effect": slots,
            "mean": stats["mean"],
            "std": stats["std"],
            "count": stats["count"],
            "mean_delta": delta["mean"],
        }
    )
    summary: dict[str, Any] = {
        "models": {lab: models[lab].model_id for lab in labels},
        "control_model": control,
        "normalisation": normalisation,
        "n_pairs": len(df),
        "designs": {str(k): int(v) for k, v in pd.Series(prepared[base].changed).value_counts().items() if k},
        "min_gap": min_gap,
        "pairs_kept": {n: int(keep.sel(run=n).sum()) for n in names},
        "sites": list(sites),
        "layers": [int(x) for x in ex["layer"].values],
        "slots": list(slots["slot"].values),
        "timing": timing,
        "mean_ld_true": {n: float(ex["ld_true"].sel(run=n).mean()) for n in names},
        "mean_ld_false": {n: float(ex["ld_false"].sel(run=n).mean()) for n in names},
        "mean_pd_true": {n: float(ex["pd_true"].sel(run=n).mean()) for n in names},
        "mean_pd_false": {n: float(ex["pd_false"].sel(run=n).mean()) for n in names},
        "peak_layer": {n: {s: _peak_layers(stats["mean"].sel(run=n, site=s)) for s in sites} for n in names},
        "controls_settings": controls,
    }
    if attribution:
        at = stack(attr_ds)
        data["attribution"] = at["effect"]
        # attribution estimates logit differences: compare it with the logit-normalised exact effect
        ex_logit = normalised_effect(ex["patched"], ex["ld_true"], ex["ld_false"])
        summary["attribution_correlation"] = {
            n: {s: pearson(ex_logit.sel(run=n, site=s).where(keep.sel(run=n)).values,
                           at["effect"].sel(run=n, site=s).where(keep.sel(run=n)).values) for s in sites}
            for n in names
        }
        # the same over every pair, un-normalised: defined even when no pair is kept
        summary["attribution_correlation_raw"] = {
            n: {s: pearson((ex["patched"] - ex["ld_false"]).sel(run=n, site=s).values,
                           (at["patched"] - at["ld_false"]).sel(run=n, site=s).values) for s in sites}
            for n in names
        }
        at.attrs.update(estimate=attribution_method, signed=attr_signed)  # stacking the runs dropped them
        agreement = attribution_agreement(ex.assign(effect=ex_logit), at, keep=keep)
        summary["attribution_agreement"] = agreement
        summary["attribution_method"] = attribution_method
        summary["attribution_speedup"] = {
            n: timing[n]["exact_s"] / timing[n]["attribution_s"] if timing[n]["attribution_s"] > 0 else None
            for n in names
        }
    comparisons: dict[str, Any] = {}
    findings: list[Finding] = []
    diffs: dict[str, list[tuple[str, xr.DataArray, dict[str, float]]]] = {s: [] for s in sites}
    main_site = "resid_post" if "resid_post" in sites else sites[0]
    slot_roles = list(slots["slot_role"].values)
    for a, b in group.pairs:
        key = f"{a} vs {b}"
        comp: dict[str, Any] = {}
        for s in sites:
            ma, mb = stats["mean"].sel(run=a, site=s), stats["mean"].sel(run=b, site=s)
            c = compare_heatmaps(ma, mb)
            data[f"difference_{b}_{a}_{s}"] = c.pop("difference")
            binned = xr.DataArray(binned_difference(ma.values, mb.values, controls.n_bins), dims=ma.dims,
                                  coords=ma.coords)
            data[f"binned_difference_{b}_{a}_{s}"] = binned
            c["max_abs_diff"] = {"raw": max_abs_by_role((mb - ma).values, slot_roles),
                                 "binned": max_abs_by_role(binned.values, slot_roles)}
            diffs[s].append((f"{b} − {a}", binned, c["max_abs_diff"]["binned"]))
            c["delta_correlation"] = pearson(delta["mean"].sel(run=a, site=s), delta["mean"].sel(run=b, site=s))
            c["controls"] = _compare_site(slots, keep, gap, prepared[base], a, b, s, cross, control, controls)
            if cross:
                for (src, tgt), pre in (((a, b), "cross"), ((b, a), "reverse_cross")):
                    x = c["controls"]["cross"][f"{src}->{tgt}"]
                    c[f"{pre}_correlation"] = x.comparison.correlation
                    c[f"{pre}_transfer"] = x.transfer
                    c[f"{pre}_delta_correlation"] = pearson(delta["mean"].sel(run=f"{src}->{tgt}", site=s),
                                                            delta["mean"].sel(run=tgt, site=s))
            comp[s] = c
        comparisons[key] = comp
        main = comp[main_site]["controls"]
        figs, ctl = _verdict_numbers(main, a, b)
        figs["delta_correlation"] = comp[main_site]["delta_correlation"]
        figs["max_abs_binned_diff"] = _finite_max(comp[main_site]["max_abs_diff"]["binned"].values())
        verdict, reason = knowledge_verdict(
            main["maps"], separated=main["separation"], control=main["control"].correlation if control else None,
            cross=main.get("cross"), names=(a, b), settings=controls)
        kept = {n: int(keep.sel(run=n).sum()) for n in (a, b)}
        m = main["maps"]
        detail = (f"{normalisation}-normalised {main_site} heatmaps over pairs kept {kept[a]} / {kept[b]} of {len(df)}: "
                  f"correlation {m.correlation:.3f} (95% CI [{m.interval[0]:.3f}, {m.interval[1]:.3f}]), permuted "
                  f"null bound {m.null_upper:.3f}, split-half reliability {m.reliability[0]:.3f} / "
                  f"{m.reliability[1]:.3f} (ceiling {m.ceiling:.3f})"
                  + (f"; control model {control}: correlation with {a} {main['control'].correlation:.3f}"
                     if control else "")
                  + "".join(f"; {n}: correlation with {n.split('->')[1]}'s own {x.comparison.correlation:.3f}, "
                            f"effect {x.transfer:.2f}x" for n, x in main.get("cross", {}).items())
                  + f"; un-normalised heatmaps (all pairs) correlate {figs['delta_correlation']:.3f}")
        findings.append(Finding("knowledge storage unchanged", key, figs, verdict, detail, reason=reason,
                                interval=m.interval, controls={**ctl, "delta_correlation": figs["delta_correlation"]}))
    summary["comparisons"] = comparisons
    d = Path(out_dir) / "knowledge"
    figures: dict[str, Path] = {}
    for s in sites:
        figures[f"heatmap_{s}"] = _heatmap_figure(stats, s, names, diffs[s], controls.n_bins, d / f"heatmap_{s}.png")
    if attribution:
        figures["attribution"] = _attribution_figure(
            ex.assign(effect=ex_logit).sel(site=sites[0]), at.sel(site=sites[0]), names, d / "attribution_vs_exact.png")
    summary["seconds"] = time.perf_counter() - t0
    data.attrs = {"study": "knowledge", "roles": list(ROLES), "models": summary["models"],
                  "normalisation": normalisation}
    notes = {"attribution": f"{agreement.message()}. Each point: one (pair, layer, position) of {sites[0]}, the "
                            "estimate against exact patching (logit-normalised)."} if attribution else {}
    result = StudyResult("knowledge", data, summary, figures, findings, notes)
    if save:
        result.save(out_dir)
    return result


# -- the study as the main job, sweeps and notebooks run it ------------------------------------------------


@dataclass(frozen=True)
class KnowledgeConfig:
    """Every option of the knowledge study and its verdict controls (see :func:`run_knowledge`)."""

    sites: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out")
    layers: str | tuple[int, ...] = "all"
    cross: bool = True
    attribution: bool = True
    limit: int | None = None
    positions: str = "statement"
    min_gap: float | None = 0.1
    token_budget: int = 8192
    normalisation: str = "logit"
    control_model: str | None = None
    controls: KnowledgeControls = KnowledgeControls()
    attribution_method: str = "ig"
    few_shot: bool = True  # False: zero-shot prompts, even where a shots.json lies beside the pairs


def _run_study(ctx: StudyContext, config: KnowledgeConfig) -> StudyResult:
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    shots = (ctx.datasets.get("shots") or "auto") if options.pop("few_shot") else None
    return run_knowledge(ctx.group, ctx.dataset("pairs", "knowledge"), ctx.out, shots=shots,
                         device=ctx.device, models=ctx.all_models(), save=False, **options)


def _check(config: KnowledgeConfig, group: ModelGroup, datasets: Mapping[str, Any],
           layers: Mapping[str, int]) -> None:
    _check_options(config.sites, config.positions, config.normalisation, config.attribution, config.attribution_method)
    if not config.few_shot and datasets.get("shots") is not None:
        raise KnowledgeOptionError("few_shot is off but shots are given: zero-shot prompts read no shots; give one of them")
    for label, n in layers.items():
        try:
            parse_layers(config.layers, n)
        except ValueError as e:
            raise KnowledgeOptionError(f"layers: {e} (model {label!r} has {n} layers)") from None
    if datasets.get("pairs") is not None:
        load_pairs(datasets["pairs"])


study = StudyDef(
    name="knowledge", Config=KnowledgeConfig, datasets=("pairs", "shots"),
    requirements=lambda config, group, datasets: [],  # patching runs the models; it reads no store
    run=_run_study, describe="activation patching of true/false fact pairs over layers x positions, within and across models",
    check=_check,
)
