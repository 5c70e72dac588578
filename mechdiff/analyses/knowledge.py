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

Efficient by construction (:func:`exact_patching`):

- The clean (true) and corrupted (false) runs are made once per batch of pairs, capturing every layer's
  residual stream, the patched sites and the attention keys/values.
- Patching position ``p`` cannot change positions before ``p`` (causal attention), and a patch whose value
  equals the value it replaces changes nothing. Those variants are answered from the false run without
  running anything, and the rest only recompute the suffix from the first position any of them touches,
  attending to the false run's cached keys/values for the prefix.
- A patch at layer ``l`` resumes from the cached residual stream at layer ``l``: the HF decoder blocks
  (``adapter.layer(k)``) are called directly, with the keyword arguments (rotary position embeddings, masks,
  cache positions) recorded from the model's own forward over the same suffix, so no architecture's position
  handling is re-implemented here. Variants of every layer share one batched pass ("staggered": rows that
  start at layer ``l`` join the batch at block ``l``).
- Before it is trusted, the resumed path must reproduce the model's own logits for the unpatched rows; where
  it cannot (an architecture whose blocks need more than what was recorded), the batch falls back to full
  forwards with engine ``Intervention(kind="replace")`` hooks, still batched.

:func:`naive_patching` is the reference (one full forward per variant, patched by a hand-written hook), and
:func:`~mechdiff.analyses.attribution.attribution_patching` the fast estimates (gradient x activation difference
and its corrections, a few forwards and backwards per batch of pairs), judged against exact patching in every run.

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

import inspect
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from mechdiff.errors import MechdiffError
from mechdiff.analyses.attribution import METHODS as ATTRIBUTION_METHODS
from mechdiff.analyses.attribution import AttributionError, attribution_agreement, attribution_patching
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult
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
from mechdiff.engine.adapter import hidden_from_output, replace_hidden_in_output
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Capture, Intervention, SiteError, hooks, parse_layers, parse_sites

__all__ = [
    "PAIR_COLUMNS",
    "SPAN_COLUMNS",
    "PATCH_SITES",
    "ROLES",
    "NORMALISATIONS",
    "PairError",
    "ModelMismatchError",
    "KnowledgeOptionError",
    "PatchingPairs",
    "load_pairs",
    "load_shots",
    "prepare_pairs",
    "exact_patching",
    "naive_patching",
    "attribution_patching",
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
PATCH_SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act")
_RESID = ("resid_pre", "resid_post")
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


class PairError(MechdiffError, ValueError):
    """A patching pair that cannot be used (unequal token lengths, identical prompts, bad answers, ...)."""


class ModelMismatchError(MechdiffError, ValueError):
    """Two models that cannot be patched into each other (different tokenizers or shapes)."""


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


@dataclass
class PatchingPairs:
    """Tokenised pairs, ready for patching. Per pair: equal-length token ids, answer tokens, token roles."""

    true_ids: list[list[int]]
    false_ids: list[list[int]]
    answers: np.ndarray  # [pair, 2] token ids of (true answer, false answer)
    roles: list[np.ndarray]  # per pair, per token: index into ROLES
    topics: np.ndarray
    true_prompts: list[str]
    false_prompts: list[str]
    tokenizer_hash: str = ""
    changed: np.ndarray | None = None  # per pair: which span differs (the ``changed`` column, or from the spans)

    def __len__(self) -> int:
        return len(self.true_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.true_ids])

    def subset(self, idx: Sequence[int]) -> "PatchingPairs":
        idx = list(idx)
        return PatchingPairs(
            [self.true_ids[i] for i in idx], [self.false_ids[i] for i in idx], self.answers[idx],
            [self.roles[i] for i in idx], self.topics[idx], [self.true_prompts[i] for i in idx],
            [self.false_prompts[i] for i in idx], self.tokenizer_hash,
            None if self.changed is None else self.changed[idx],
        )

    def role_matrix(self) -> np.ndarray:
        """[pair, position] role codes, right-aligned like the results (-1 = no token there)."""
        t = int(self.lengths.max())
        out = np.full((len(self), t), _PAD_ROLE, dtype=np.int8)
        for i, r in enumerate(self.roles):
            out[i, t - len(r) :] = r
        return out


def _prompt(statement: str, topic: str, shots: Mapping[str, Sequence[tuple[str, int]]] | None) -> str:
    from mechdiff.zoo.templates import truth_prompt

    return truth_prompt(statement, (shots or {}).get(topic, ()))


def _answer_token(tokenizer, prompt: str, prompt_ids: list[int], answer: str, where: str) -> int:
    """The first token the answer adds after the prompt (so word-boundary handling follows the tokenizer)."""
    full = tokenizer(prompt + " " + answer)["input_ids"]
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        tok = full[len(prompt_ids)]
    else:
        ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PairError(f"{where}: answer {answer!r} tokenizes to nothing")
        tok = ids[0]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and tok == unk:
        raise PairError(f"{where}: answer {answer!r} is not in the tokenizer's vocabulary (it maps to the unknown "
                        "token)")
    return int(tok)


def _offsets(tokenizer, prompt: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character span of each token of ``prompt`` (None for tokenizers that cannot say)."""
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return None
    return offsets if offsets is not None and len(offsets) == len(ids) else None


def _statement_start(tokenizer, prompt: str, statement: str, ids: list[int]) -> int:
    """Index of the statement's first token in ``prompt`` (the last occurrence: shots come before it)."""
    char = prompt.rfind(statement)
    if char < 0:
        return 0
    offsets = _offsets(tokenizer, prompt, ids)
    if offsets is not None:
        for t, (a, b) in enumerate(offsets):
            if b > a and b > char:
                return t
        return len(ids)
    # Slow tokenizers: count the tokens of the text before the statement.
    return len(tokenizer(prompt[:char].rstrip())["input_ids"]) if char else 0


def _span_columns(df: pd.DataFrame) -> dict[str, list[str]] | None:
    """The :data:`SPAN_COLUMNS` the file has, per role; None unless it names both a subject and an object."""
    cols = {role: [c for c in names if c in df.columns] for role, names in SPAN_COLUMNS.items()}
    return cols if all(cols.values()) else None


def _find_word(text: str, word: str, last: bool) -> int:
    """Character index of ``word`` in ``text`` (not inside a longer word), its first or last occurrence; -1."""
    hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text)]
    return (hits[-1] if last else hits[0]) if hits else -1


def _span_tokens(tokenizer, prompts: Sequence[str], statements: Sequence[str], ids: Sequence[list[int]],
                 texts: Sequence[str], last: bool) -> np.ndarray | None:
    """Token indices of the first of ``texts`` found in a statement (the true one, then the false one: equal
    token lengths make the positions the same in both), via the tokenizer's offsets; empty if none is found,
    None if the tokenizer has no offsets."""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        for prompt, statement, tok_ids in zip(prompts, statements, ids):
            c0, at = prompt.rfind(statement), _find_word(statement, text, last)
            if c0 < 0 or at < 0:
                continue
            a, b = c0 + at, c0 + at + len(text)
            offsets = _offsets(tokenizer, prompt, tok_ids)
            if offsets is None:
                return None
            hit = [t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
            if hit:
                return np.asarray(hit)
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
        start = _statement_start(tokenizer, tp[i], df["true_statement"][i], a)
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
        [list(x) for x in t_ids], [list(x) for x in f_ids], np.asarray(answers, dtype=np.int64), roles,
        df["topic"].to_numpy(dtype=object), tp, fp, tokenizer_hash, np.asarray(changed, dtype=object),
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


def _check_patchable(source: LoadedModel, target: LoadedModel) -> None:
    if source is target:
        return
    if source.tokenizer_hash != target.tokenizer_hash:
        raise ModelMismatchError(
            f"cross-model patching needs one tokenizer, but {source.model_id!r} and {target.model_id!r} have "
            f"different tokenizers ({source.tokenizer_hash[:19]}.. vs {target.tokenizer_hash[:19]}..): token "
            "positions would not correspond"
        )
    a, b = source.adapter, target.adapter
    for what in ("n_layers", "d_model", "d_mlp"):
        if getattr(a, what) != getattr(b, what):
            raise ModelMismatchError(
                f"cross-model patching needs the same shapes, but {source.model_id!r} has {what}={getattr(a, what)} "
                f"and {target.model_id!r} has {what}={getattr(b, what)}"
            )


def _check_pairs_for(lm: LoadedModel, pairs: PatchingPairs) -> None:
    if pairs.tokenizer_hash and pairs.tokenizer_hash != lm.tokenizer_hash:
        raise ModelMismatchError(
            f"these pairs were tokenized with another tokenizer than {lm.model_id!r}'s; prepare them with its tokenizer"
        )
    if int(pairs.answers.max()) >= lm.adapter.vocab_size:
        raise PairError(f"an answer token id exceeds {lm.model_id!r}'s vocabulary of {lm.adapter.vocab_size}")


# =============================================================================================
# shared machinery


def _position_mask(pairs: PatchingPairs, i: int, positions: str) -> np.ndarray:
    """Which token positions of pair ``i`` to patch: ``all``, or ``statement`` (all but the context role: the
    few-shot examples before the statement, which a within-model patch cannot change anyway)."""
    if positions == "all":
        return np.ones(len(pairs.roles[i]), dtype=bool)
    if positions == "statement":
        return pairs.roles[i] != ROLES.index("context")
    raise ValueError(f"positions {positions!r}: all or statement")


def _resolve_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    out = parse_sites(sites)
    bad = [s for s in out if s not in PATCH_SITES]
    if bad:
        raise SiteError(f"cannot patch site {bad[0]!r}: choose from {', '.join(PATCH_SITES)}")
    return out


def _groups(pairs: PatchingPairs, token_budget: int, max_pairs: int = 64,
            order: np.ndarray | None = None) -> list[list[int]]:
    """Pairs of one token length together (no padding at all), at most ``token_budget`` tokens per prompt batch;
    within a length, pairs go in ``order`` (default: as given)."""
    by_len: dict[int, list[int]] = {}
    for i in (range(len(pairs)) if order is None else order):
        by_len.setdefault(int(pairs.lengths[i]), []).append(int(i))
    out = []
    for n, idx in sorted(by_len.items()):
        size = max(1, min(max_pairs, token_budget // max(1, n)))
        out += [idx[j : j + size] for j in range(0, len(idx), size)]
    return out


def _forward_kwargs(model) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _metric(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """logit(true answer) - logit(false answer), per row; ``logits`` [rows, vocab], ``answers`` [rows, 2]."""
    # float64 so a float64 model keeps its precision; float32 models lose nothing either
    return (logits.gather(1, answers[:, :1]).squeeze(1).double() - logits.gather(1, answers[:, 1:]).squeeze(1).double())


def _readout(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[rows, 2]: logit(true answer) - logit(false answer), and P(true answer) - P(false answer) (the paper's PD,
    softmax over the whole vocabulary), in float64."""
    p = torch.softmax(logits.double(), dim=-1)
    pd = p.gather(1, answers[:, :1]).squeeze(1) - p.gather(1, answers[:, 1:]).squeeze(1)
    return torch.stack([_metric(logits, answers), pd], dim=1)


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


def _run(lm: LoadedModel, ids: torch.Tensor, capture: Capture | None = None, **kw) -> Any:
    """One forward of equal-length rows (no padding, so no mask), with optional capture hooks."""
    with hooks(lm.adapter, capture):
        return lm.model(input_ids=ids, **_forward_kwargs(lm.model), **kw)


def _align(values: Mapping[int, np.ndarray], pairs: PatchingPairs, lead: tuple[int, ...]) -> np.ndarray:
    """Per-pair [..., T_i] arrays right-aligned into one [lead[0], pair, *lead[1:], T] array (NaN-padded)."""
    n, t = len(pairs), int(pairs.lengths.max())
    out = np.full((lead[0], n, *lead[1:], t), np.nan)
    for i in range(n):
        out[:, i, ..., t - len(pairs.true_ids[i]) :] = values[i]
    return out


def _dataset(
    values: dict[str, np.ndarray],
    pairs: PatchingPairs,
    sites: tuple[str, ...],
    layers: tuple[int, ...],
    ld_true: np.ndarray,
    ld_false: np.ndarray,
    attrs: dict[str, Any],
    *,
    prob: tuple[dict[int, np.ndarray], np.ndarray, np.ndarray] | None = None,
    normalisation: str = "logit",
) -> xr.Dataset:
    """Assemble per-pair [site, layer, T] arrays (keyed ``patched``) into right-aligned labelled arrays.
    ``prob``: the same for P(TRUE) - P(FALSE), with its true- and false-run values (needed by ``"paper"``)."""
    if normalisation == "paper" and prob is None:
        raise KnowledgeOptionError(f"{attrs.get('method', 'this')} patching has no probability readout: normalisation 'paper' "
                        "needs exact or naive patching")
    dims = ("site", "pair", "layer", "position")
    patched = _align(values, pairs, (len(sites), len(layers)))
    data: dict[str, Any] = {"patched": (dims, patched), "ld_true": ("pair", ld_true), "ld_false": ("pair", ld_false)}
    if prob is not None:
        pd_patched = _align(prob[0], pairs, (len(sites), len(layers)))
        data.update(patched_pd=(dims, pd_patched), pd_true=("pair", prob[1]), pd_false=("pair", prob[2]))
    if normalisation == "paper":
        effect = normalised_effect(pd_patched, prob[1][None, :, None, None], prob[2][None, :, None, None], "paper")
    else:
        effect = normalised_effect(patched, ld_true[None, :, None, None], ld_false[None, :, None, None])
    coords = {
        "site": list(sites),
        "pair": np.arange(len(pairs)),
        "layer": np.asarray(layers),
        "position": np.arange(-int(pairs.lengths.max()), 0),
        "topic": ("pair", np.asarray(pairs.topics, dtype=str)),
        "n_tokens": ("pair", pairs.lengths),
        "role": (("pair", "position"), pairs.role_matrix()),
    }
    if pairs.changed is not None:
        coords["changed"] = ("pair", np.asarray(pairs.changed, dtype=str))
    return xr.Dataset({"effect": (dims, effect), **data}, coords=coords,
                      attrs={"roles": list(ROLES), "normalisation": normalisation, **attrs})


# =============================================================================================
# exact patching


class _ResumeFailed(RuntimeError):
    pass


@dataclass
class _Group:
    """Everything one batch of equal-length pairs needs: clean/corrupted caches and recorded block calls."""

    idx: list[int]
    n_tokens: int
    answers: torch.Tensor  # [G, 2]
    true_run: torch.Tensor  # [G, 2] readout (logit difference, probability difference) of the target's true run
    false_run: torch.Tensor  # [G, 2] the same, false run
    false_ids: torch.Tensor  # [G, T]
    # target false run, [G, T, d]: resid_pre of block k for k < L, the last block's resid_post at L
    resid: list[torch.Tensor]
    src: dict[tuple[str, int], torch.Tensor]  # source true run: [G, T, w]
    tgt: dict[tuple[str, int], torch.Tensor]  # target false run: [G, T, w]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # target false run keys/values per layer
    start: int = 0  # first suffix position recomputed
    records: dict[int, tuple[tuple, dict]] = field(default_factory=dict)


def _caches(source: LoadedModel, target: LoadedModel, pairs: PatchingPairs, idx: list[int],
            sites: tuple[str, ...], layers: tuple[int, ...], want_kv: bool) -> _Group:
    dev = target.device
    L = target.adapter.n_layers
    t_ids = torch.tensor([pairs.true_ids[i] for i in idx], device=dev)
    f_ids = torch.tensor([pairs.false_ids[i] for i in idx], device=dev)
    answers = torch.as_tensor(pairs.answers[idx], device=dev)
    g = len(idx)
    all_layers = tuple(range(L))
    # One capture of the target's false run: every block input (to resume from) plus the patched sites.
    tgt_sites = tuple(dict.fromkeys(("resid_pre", *sites, "resid_post")))
    if source is target:
        cap = Capture(tgt_sites, all_layers)
        out = _run(target, torch.cat([t_ids, f_ids]), cap, use_cache=want_kv)
        m = _readout(out.logits[:, -1], answers.repeat(2, 1))
        true_run, false_run = m[:g], m[g:]
        src = {(s, l): cap.acts[(s, l)][:g] for s in sites for l in layers}
        tgt = {(s, l): cap.acts[(s, l)][g:] for s in sites for l in layers}
        acts = {k: v[g:] for k, v in cap.acts.items()}
        rows = slice(g, 2 * g)
    else:
        scap = Capture(sites, layers)
        _run(source, t_ids, scap, use_cache=False)
        src = dict(scap.acts)
        true_run = _readout(_run(target, t_ids, None, use_cache=False).logits[:, -1], answers)
        cap = Capture(tgt_sites, all_layers)
        out = _run(target, f_ids, cap, use_cache=want_kv)
        false_run = _readout(out.logits[:, -1], answers)
        acts = cap.acts
        tgt = {(s, l): acts[(s, l)] for s in sites for l in layers}
        rows = slice(0, g)
    resid = [acts[("resid_pre", k)] for k in range(L)] + [acts[("resid_post", L - 1)]]
    kv = _layer_kv(out.past_key_values, rows, L, t_ids.shape[1]) if want_kv else None
    return _Group(idx, int(t_ids.shape[1]), answers, true_run, false_run, f_ids, resid, src, tgt, kv)


def _layer_kv(cache: Any, rows: slice, n_layers: int, n_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Keys and values per layer of ``rows`` of a forward's cache, or None where no prefix can be cut from it."""
    try:
        kv = [(cache.layers[k].keys[rows], cache.layers[k].values[rows]) for k in range(n_layers)]
    except (AttributeError, IndexError, TypeError):
        return None  # not a layered cache: resuming from a prefix is not possible, only from position 0
    # a sliding-window layer shorter than the prompt keeps only its last keys: no prefix to slice
    if any(k.dim() != 4 or k.shape[-2] != n_tokens for k, _ in kv):
        return None
    return kv


def _prefix_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]], s: int, rows: torch.Tensor | None = None,
                  first_layer: int = 0):
    """A fresh cache holding the first ``s`` positions' keys/values (of ``rows``, default all) of the layers from
    ``first_layer`` on, to run a suffix on."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    for k, (key, val) in enumerate(kv):
        key, val = key[:, :, :s], val[:, :, :s]
        if rows is not None:
            key, val = key.index_select(0, rows), val.index_select(0, rows)
        past.update(key, val, first_layer + k)
    return past


def _cache_arg(model) -> str:
    # newer transformers name the cache argument ``cache`` (``past_key_values`` is deprecated there)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _expand(x: Any, src: torch.Tensor, g: int, cache: Any) -> Any:
    """A recorded block argument for the replay batch: batch-leading tensors of the recorded batch ``g`` are
    re-indexed by ``src`` (replay row -> recorded row); any KV cache is replaced by ``cache``."""
    from transformers.cache_utils import Cache

    if isinstance(x, Cache):
        return cache
    if isinstance(x, torch.Tensor):
        # dim >= 2 so that 1-D tensors (cache positions) are never mistaken for a batch
        return x.index_select(0, src) if x.dim() >= 2 and x.shape[0] == g else x
    if isinstance(x, tuple):
        return tuple(_expand(y, src, g, cache) for y in x)
    if isinstance(x, list):
        return [_expand(y, src, g, cache) for y in x]
    if isinstance(x, dict):
        return {k: _expand(v, src, g, cache) for k, v in x.items()}
    return x


def _record(target: LoadedModel, grp: _Group) -> None:
    """Run the false prompts' suffix once through the model, recording each block's call (args, kwargs).

    With a prefix (start > 0) the model sees the prefix's keys/values in its cache, so the recorded position
    embeddings, masks and cache positions are exactly those of the suffix.
    """
    adapter = target.adapter
    s = grp.start
    records: dict[int, tuple[tuple, dict]] = {}

    def make(k: int):
        def pre(module, args, kwargs):
            records[k] = (tuple(args), dict(kwargs))
        return pre

    past = _prefix_cache(target.model, grp.kv, s) if s > 0 else None
    handles = [adapter.layer(k).register_forward_pre_hook(make(k), with_kwargs=True) for k in range(adapter.n_layers)]
    try:
        target.model(input_ids=grp.false_ids[:, s:], use_cache=s > 0, **{_cache_arg(target.model): past},
                     **_forward_kwargs(target.model))
    finally:
        for h in handles:
            h.remove()
    if len(records) != adapter.n_layers:
        raise _ResumeFailed(f"only {len(records)} of {adapter.n_layers} blocks were called")
    grp.records = records


def _call_block(target: LoadedModel, grp: _Group, k: int, hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    args, kwargs = grp.records[k]
    cache = None
    if grp.start > 0:
        cache = _prefix_cache(target.model, grp.kv[k : k + 1], grp.start, src, first_layer=k)
    g = len(grp.idx)
    a = _expand(args[1:], src, g, cache)
    kw = _expand(kwargs, src, g, cache)
    if args:
        out = target.adapter.layer(k)(hidden, *a, **kw)
    else:
        out = target.adapter.layer(k)(**{**kw, "hidden_states": hidden})
    return hidden_from_output(out)


@dataclass
class _Rows:
    """Patch variants: site index, layer, pair (in group), position, first block that must run."""

    site: torch.Tensor
    layer: torch.Tensor
    pair: torch.Tensor
    pos: torch.Tensor
    start: torch.Tensor

    def __len__(self) -> int:
        return int(self.site.numel())

    def take(self, sel: torch.Tensor) -> "_Rows":
        return _Rows(self.site[sel], self.layer[sel], self.pair[sel], self.pos[sel], self.start[sel])


def _rows(grp: _Group, sites: tuple[str, ...], layers: tuple[int, ...], skip_unchanged: bool,
          allowed: torch.Tensor) -> tuple[_Rows, int]:
    """Variants to run (at ``allowed`` [G, T] positions); with ``skip_unchanged`` those whose patch value equals
    the value it replaces are left out (exactly a no-op: the result is the false run). Returns the rows and the
    number left out."""
    parts = []
    skipped = 0
    for si, site in enumerate(sites):
        for l in layers:
            run = allowed.clone()
            if skip_unchanged:
                same = torch.eq(grp.src[(site, l)], grp.tgt[(site, l)]).all(-1)  # [G, T]
                skipped += int((same & allowed).sum())
                run &= ~same
            g, p = torch.nonzero(run, as_tuple=True)
            start = l + 1 if site == "resid_post" else l
            parts.append(torch.stack([torch.full_like(g, si), torch.full_like(g, l), g, p, torch.full_like(g, start)]))
    allr = torch.cat(parts, dim=1) if parts else torch.zeros(5, 0, dtype=torch.long)
    order = torch.argsort(allr[4], stable=True)  # by first block, so rows join the batch in order
    allr = allr[:, order]
    return _Rows(*allr), skipped


def _replay(target: LoadedModel, grp: _Group, rows: _Rows, sites: tuple[str, ...]) -> torch.Tensor:
    """Resume every row from its cached residual stream; rows join the batch at their first block. Returns
    the readout per row, [rows, 2] (see :func:`_readout`)."""
    order = torch.argsort(rows.start, stable=True)  # rows join the batch in this order
    rows = rows.take(order)
    adapter = target.adapter
    L = adapter.n_layers
    s = grp.start
    hidden: torch.Tensor | None = None
    src_rows = torch.zeros(0, dtype=torch.long, device=rows.pair.device)
    k0 = int(rows.start.min())
    n_done = 0
    for k in range(k0, L + 1):
        new = torch.nonzero(rows.start == k, as_tuple=True)[0]
        if len(new):
            nr = rows.take(new)
            x = grp.resid[k].index_select(0, nr.pair)[:, s:].clone()
            for si, site in enumerate(sites):
                if site not in _RESID:
                    continue
                m = torch.nonzero(nr.site == si, as_tuple=True)[0]
                if len(m):
                    l = k if site == "resid_pre" else k - 1
                    x[m, nr.pos[m] - s] = grp.src[(site, l)][nr.pair[m], nr.pos[m]]
            hidden = x if hidden is None else torch.cat([hidden, x])
            src_rows = torch.cat([src_rows, nr.pair])
            n_done += len(new)
        if k == L:
            break
        if hidden is None:
            continue
        ivs = []
        b = hidden.shape[0]
        for si, site in enumerate(sites):
            if site in _RESID:
                continue
            m = torch.nonzero((rows.site[:b] == si) & (rows.layer[:b] == k), as_tuple=True)[0]
            if len(m) == 0:
                continue
            src_val = grp.src[(site, k)]
            index = torch.full((b, 1), -1, dtype=torch.long, device=hidden.device)
            index[m, 0] = rows.pos[m] - s
            values = torch.zeros(b, 1, src_val.shape[-1], dtype=src_val.dtype, device=hidden.device)
            values[m, 0] = src_val[rows.pair[m], rows.pos[m]]
            ivs.append(Intervention(site, k, "replace", values=values, index=index))
        with hooks(adapter, None, ivs):
            hidden = _call_block(target, grp, k, hidden, src_rows)
    assert hidden is not None and n_done == len(rows)
    logits = adapter.logits(hidden[:, -1])
    out = torch.empty(len(rows), 2, dtype=torch.float64, device=logits.device)
    out[order] = _readout(logits, grp.answers.index_select(0, rows.pair))
    return out


def _hooked(target: LoadedModel, grp: _Group, rows: _Rows, sites: tuple[str, ...]) -> torch.Tensor:
    """Full forwards of the false prompts with engine replace-interventions (the fallback), batched."""
    b = len(rows)
    ivs = []
    for si, site in enumerate(sites):
        for l in torch.unique(rows.layer[rows.site == si]).tolist():
            m = torch.nonzero((rows.site == si) & (rows.layer == l), as_tuple=True)[0]
            src_val = grp.src[(site, l)]
            index = torch.full((b, 1), -1, dtype=torch.long, device=src_val.device)
            index[m, 0] = rows.pos[m]
            values = torch.zeros(b, 1, src_val.shape[-1], dtype=src_val.dtype, device=src_val.device)
            values[m, 0] = src_val[rows.pair[m], rows.pos[m]]
            ivs.append(Intervention(site, int(l), "replace", values=values, index=index))
    with hooks(target.adapter, None, ivs):
        out = target.model(input_ids=grp.false_ids.index_select(0, rows.pair), use_cache=False,
                           **_forward_kwargs(target.model))
    return _readout(out.logits[:, -1], grp.answers.index_select(0, rows.pair))


def _segments(rows: _Rows, n_tokens: int, g: int, n_layers: int, prefix_ok: bool) -> list[tuple[int, torch.Tensor]]:
    """Split variants by patch position into segments that each recompute only from their first position.

    A segment starting at ``s`` costs, in token-layers, sum over its rows of (layers resumed) x (T - s), plus a
    recording pass of the group's ``g`` prompts over (T - s) tokens and a fixed cost per pass; the split
    minimising the total is found by dynamic programming over the distinct positions. Returns (start, row
    indices) per segment.
    """
    if not prefix_ok:
        return [(0, torch.arange(len(rows), device=rows.pos.device))]
    p = rows.pos.cpu().numpy()
    depth = np.maximum(1, n_layers - rows.start.cpu().numpy())  # blocks each row runs (1: the unembedding)
    u, inv = np.unique(p, return_inverse=True)
    wsum = np.concatenate([[0.0], np.cumsum(np.bincount(inv, weights=depth, minlength=len(u)))])
    m = len(u)
    best = np.zeros(m + 1)
    arg = np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):
        i = np.arange(j)
        suffix = n_tokens - u[i]
        cost = best[i] + (wsum[j] - wsum[i] + g * n_layers) * suffix + n_layers * n_tokens
        k = int(np.argmin(cost))
        best[j], arg[j] = cost[k], k
    out = []
    j = m
    while j > 0:
        i = int(arg[j])
        sel = np.nonzero((p >= u[i]) & (p <= u[j - 1]))[0]
        out.append((int(u[i]), torch.as_tensor(sel, device=rows.pos.device)))
        j = i
    return out[::-1]


def _chunks(rows: _Rows, per_row_tokens: int, token_budget: int) -> list[torch.Tensor]:
    size = max(1, token_budget // max(1, per_row_tokens))
    n = len(rows)
    return [torch.arange(a, min(n, a + size), device=rows.pair.device) for a in range(0, n, size)]


def _validate(target: LoadedModel, grp: _Group) -> None:
    """The resumed path must reproduce the model's own logits for unpatched rows (each pair twice, so the
    re-indexing of recorded arguments is exercised)."""
    g = len(grp.idx)
    pair = torch.arange(g, device=grp.false_ids.device).repeat(2)
    z = torch.zeros_like(pair)
    ident = _Rows(z - 1, z, pair, z + grp.start, z)  # site -1: no patch
    got = _replay(target, grp, ident, ())[:, 0]
    want = grp.false_run[:, 0].repeat(2)
    scale = 1.0 + float(want.abs().max())
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(target.dtype, 5e-2) * scale
    err = float((got - want).abs().max())
    if not err <= tol:
        raise _ResumeFailed(f"resumed blocks differ from the model's forward by {err:.3g} (> {tol:.3g})")


def exact_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: PatchingPairs,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    method: str = "auto",
    skip_unchanged: bool = True,
    positions: str = "all",
    token_budget: int = 8192,
    reuse_prefix: bool = True,
    normalisation: str = "logit",
) -> xr.Dataset:
    """Exact activation patching of every (site, layer, position): ``source``'s true-prompt activations into
    ``target``'s false run (``target=None`` or ``source``: within one model).

    ``method``: ``resume`` (call the decoder blocks from the cached residual stream; error if it cannot be
    validated), ``hooked`` (full forwards with replace-interventions), ``auto`` (resume, else hooked).
    ``skip_unchanged``: answer patches that replace a value by an identical one from the false run.
    ``positions``: ``all``, or ``statement`` (leave the context before the statement unpatched: NaN there).
    ``token_budget``: rows x recomputed tokens per batched pass.
    ``reuse_prefix``: a resumed patch recomputes only the positions from the patched one on, attending to the
    false run's cached keys/values before it; False recomputes every position from the patched layer on.
    ``normalisation``: ``logit`` (``effect`` 0 = false run, 1 = true run, from logit differences) or ``paper``
    (``(PD_patched - PD_false) / (1 - PD_false)``, PD = P(TRUE) - P(FALSE); module docstring).

    Returns a Dataset with ``effect`` (normalised), ``patched`` (raw logit difference) and ``patched_pd`` (raw
    probability difference) over (site, pair, layer, position), ``ld_true`` / ``ld_false`` and ``pd_true`` /
    ``pd_false`` per pair, and attrs with the normalisation, method used, variants run and skipped, and seconds.
    """
    t0 = time.perf_counter()
    target = source if target is None else target
    if method not in ("auto", "resume", "hooked"):
        raise ValueError(f"method {method!r}: auto, resume or hooked")
    normalised_effect(0.0, 1.0, 0.0, normalisation)  # a bad normalisation fails before any work
    _check_patchable(source, target)
    _check_pairs_for(target, pairs)
    sites = _resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    L = target.adapter.n_layers
    values: dict[int, np.ndarray] = {}  # per pair [site, layer, T, 2]: both readouts
    runs = np.zeros((len(pairs), 2, 2))  # per pair: (true run, false run) x (logit diff, prob diff)
    n_run = n_skip = 0
    used: set[str] = set()
    resume_ok = method != "hooked"
    validated: set[bool] = set()
    with torch.no_grad():
        for idx in _groups(pairs, token_budget):
            grp = _caches(source, target, pairs, idx, sites, layers, want_kv=resume_ok and reuse_prefix)
            allowed = torch.as_tensor(np.stack([_position_mask(pairs, i, positions) for i in idx]),
                                      device=grp.false_ids.device)
            rows, skipped = _rows(grp, sites, layers, skip_unchanged, allowed)
            n_skip += skipped
            n_run += len(rows)
            res = grp.false_run[:, None, None, None].expand(len(idx), len(sites), len(layers), grp.n_tokens, 2).clone()
            res.masked_fill_(~allowed[:, None, None, :, None], float("nan"))
            if len(rows):
                out = torch.empty(len(rows), 2, dtype=torch.float64, device=grp.false_ids.device)
                mode = "hooked"
                if resume_ok:
                    try:
                        for start, sel in _segments(rows, grp.n_tokens, len(idx), L, grp.kv is not None):
                            grp.start = start
                            _record(target, grp)
                            # once per call for each way of resuming (whole prompt / after a cached prefix)
                            if (start > 0) not in validated:
                                _validate(target, grp)
                                validated.add(start > 0)
                            seg = rows.take(sel)
                            for ch in _chunks(seg, grp.n_tokens - start, token_budget):
                                part = seg.take(ch)
                                out[sel[ch]] = _replay(target, grp, part, sites)
                        mode = "resume"
                    except Exception as e:  # noqa: BLE001 - any failure to resume means: use full forwards
                        if method == "resume":
                            raise RuntimeError(f"cannot resume {target.adapter.arch} decoder blocks: {e}") from e
                        log.warning("patching %s: resuming failed (%s); using full hooked forwards", target.model_id, e)
                        resume_ok = False
                if mode == "hooked":
                    for ch in _chunks(rows, grp.n_tokens, token_budget):
                        out[ch] = _hooked(target, grp, rows.take(ch), sites)
                used.add(mode)
                lut = torch.full((L,), -1, dtype=torch.long, device=out.device)
                lut[list(layers)] = torch.arange(len(layers), device=out.device)
                res[rows.pair, rows.site, lut[rows.layer], rows.pos] = out
            for j, i in enumerate(idx):
                values[i] = res[j].cpu().numpy().astype(np.float64)
                runs[i] = torch.stack([grp.true_run[j], grp.false_run[j]]).cpu().numpy()
    attrs = {
        "method": "exact",
        "execution": "+".join(sorted(used)) or "none",
        "source": source.model_id,
        "target": target.model_id,
        "variants_run": n_run,
        "variants_skipped": n_skip,
        "seconds": time.perf_counter() - t0,
    }
    return _readout_dataset(values, runs, pairs, sites, layers, attrs, normalisation)


def _readout_dataset(values: Mapping[int, np.ndarray], runs: np.ndarray, pairs: PatchingPairs,
                     sites: tuple[str, ...], layers: tuple[int, ...], attrs: dict[str, Any],
                     normalisation: str) -> xr.Dataset:
    """:func:`_dataset` from per-pair [..., 2] readouts (logit difference, probability difference) and the true
    and false runs' ``runs`` [pair, 2 runs, 2 readouts]."""
    prob = ({i: v[..., 1] for i, v in values.items()}, runs[:, 0, 1], runs[:, 1, 1])
    return _dataset({i: v[..., 0] for i, v in values.items()}, pairs, sites, layers, runs[:, 0, 0], runs[:, 1, 0],
                    attrs, prob=prob, normalisation=normalisation)


# =============================================================================================
# naive reference


def _hand_hook(adapter, site: str, layer: int, pos: int, value: torch.Tensor):
    """A hand-written patch of one position (independent of the engine's hook code), for the reference."""

    def set_pos(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, pos] = value
        return x

    if site in ("resid_pre", "mlp_act"):
        module = adapter.layer(layer) if site == "resid_pre" else adapter.down_proj(layer)

        def pre(mod, args, kwargs):
            if args:
                return (set_pos(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": set_pos(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)
    module = {
        "resid_post": adapter.layer,
        "attn_out": adapter.attn_out_module,
        "mlp_out": adapter.mlp_out_module,
    }[site](layer)

    def post(mod, args, output):
        return replace_hidden_in_output(output, set_pos(hidden_from_output(output)))

    return module.register_forward_hook(post)


def naive_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: PatchingPairs,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    positions: str = "all",
    normalisation: str = "logit",
) -> xr.Dataset:
    """The reference: for every pair, site, layer and position, one full forward of the false prompt with that
    one activation replaced by a hand-written hook. Slow by design; same output layout as :func:`exact_patching`."""
    t0 = time.perf_counter()
    target = source if target is None else target
    normalised_effect(0.0, 1.0, 0.0, normalisation)
    _check_patchable(source, target)
    _check_pairs_for(target, pairs)
    sites = _resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    values: dict[int, np.ndarray] = {}
    runs = np.zeros((len(pairs), 2, 2))
    dev = target.device
    with torch.no_grad():
        for i in range(len(pairs)):
            t_ids = torch.tensor([pairs.true_ids[i]], device=dev)
            f_ids = torch.tensor([pairs.false_ids[i]], device=dev)
            a_t, a_f = (int(x) for x in pairs.answers[i])
            cap = Capture(sites, layers)
            with hooks(source.adapter, cap):
                source.model(input_ids=t_ids, use_cache=False)

            def ld(ids: torch.Tensor) -> tuple[float, float]:
                """(logit difference, probability difference), written out independently of ``_readout``."""
                lg = target.model(input_ids=ids, use_cache=False).logits[0, -1].double()
                p = torch.exp(lg - torch.logsumexp(lg, 0))
                return float(lg[a_t] - lg[a_f]), float(p[a_t] - p[a_f])

            runs[i] = ld(t_ids), ld(f_ids)
            n = t_ids.shape[1]
            v = np.full((len(sites), len(layers), n, 2), np.nan)
            mask = _position_mask(pairs, i, positions)
            for si, site in enumerate(sites):
                for li, l in enumerate(layers):
                    for p in np.nonzero(mask)[0].tolist():
                        h = _hand_hook(target.adapter, site, l, p, cap.acts[(site, l)][0, p])
                        try:
                            v[si, li, p] = ld(f_ids)
                        finally:
                            h.remove()
            values[i] = v
    attrs = {"method": "naive", "source": source.model_id, "target": target.model_id,
             "seconds": time.perf_counter() - t0}
    return _readout_dataset(values, runs, pairs, sites, layers, attrs, normalisation)


# =============================================================================================
# attribution patching


# the estimates live in :mod:`mechdiff.analyses.attribution` (plain AtP, AtP*'s corrections, integrated gradients)


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
        from mechdiff.zoo.paths import zoo_path

        path = Path(zoo_path("data")) / "patching.csv"
        return load_pairs(path), path
    if isinstance(pairs, pd.DataFrame):
        return load_pairs(pairs), None
    return load_pairs(pairs), Path(pairs)


def _heatmap_figure(stats: xr.Dataset, site: str, panels: list[str],
                    diffs: list[tuple[str, xr.DataArray, Mapping[str, float]]], n_bins: int, path: Path) -> Path:
    """Mean heatmaps of every run side by side, then the binned difference heatmaps (the paper's Figure 1a):
    ``diffs`` holds (title, binned difference [layer, slot], max |difference| per token group)."""
    from matplotlib import colormaps

    from mechdiff.report.plotting import new_figure, save_figure

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
    from mechdiff.report.plotting import MODEL_COLORS, new_figure, save_figure

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


def run_knowledge(
    group: ModelGroup,
    pairs: str | Path | pd.DataFrame | None,
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
) -> StudyResult:
    """The knowledge-storage study for a model group.

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
    or None for the zoo's ``patching.csv``. ``shots``: "auto" (a ``shots.json`` next to the pairs file, if any), a
    path, a mapping, or None. ``models``: already loaded models by label (else loaded from ``group``).
    ``control_model``: an unrelated model of the same tokenizer (a path, or a label in ``models``): its own
    heatmap's correlation with base's is the control a "storage unchanged" verdict must clear.
    ``controls``: sizes, seed and thresholds of the controls and the verdict rule. ``attribution_method``: the
    fast estimate (:data:`~mechdiff.analyses.attribution.METHODS`; integrated gradients by default, the one that
    tracked exact patching on the embedded pair); its agreement with exact patching is in the summary and the
    report, with a verdict on whether it can stand in for the sweep.
    Writes ``out_dir/knowledge/{results.zarr, summary.json, *.png}``.
    """
    t0 = time.perf_counter()
    normalised_effect(0.0, 1.0, 0.0, normalisation)  # bad options fail before any model loads
    if attribution and attribution_method not in ATTRIBUTION_METHODS:
        raise AttributionError(f"attribution method {attribution_method!r}: one of {', '.join(ATTRIBUTION_METHODS)}")
    df, path = _pairs_source(pairs)
    df = load_pairs(df, limit=limit)
    if shots == "auto":
        cand = path.parent / "shots.json" if path is not None else None
        shots = load_shots(cand) if cand is not None and cand.is_file() else None
    elif isinstance(shots, (str, Path)):
        shots = load_shots(shots)
    sites = _resolve_sites(sites)
    models, control = _load_group(group, models, control_model, device, dtype)
    labels = list(group.labels) + ([control] if control else [])
    base = labels[0]
    if cross:
        for lab in group.labels[1:]:
            _check_patchable(models[base], models[lab])
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
        e = exact_patching(src, tgt, prepared[t], sites=sites, layers=layers, positions=positions,
                           token_budget=token_budget, normalisation=normalisation)
        exact_ds.append(e)
        timing[name] = {"exact_s": e.attrs["seconds"], "execution": e.attrs["execution"],
                        "variants_run": e.attrs["variants_run"], "variants_skipped": e.attrs["variants_skipped"]}
        if attribution:
            a = attribution_patching(src, tgt, prepared[t], sites=sites, layers=layers, positions=positions,
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
    result.save(out_dir)
    return result
