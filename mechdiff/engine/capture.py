"""What to capture, parsed once: sites, a layer selection, positions, a prompt template, the stored dtype.

:class:`CaptureSpec` is what a user asks for (strings are accepted and parsed when it is made, so a bad
field fails there, naming itself). Against a model it resolves to a :class:`ResolvedCapture`: the layers
as indices. A store records that as its one ``capture`` attribute, and :func:`capture_of` reads it back
typed. Every comparison of captures goes through :meth:`ResolvedCapture.differences` (all fields) or
:meth:`ResolvedCapture.lacks` (what a store lacks to serve a request), which name the differing fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mechdiff.engine.batching import PromptTemplate
from mechdiff.engine.positions import Positions
from mechdiff.engine.sites import SiteError, parse_layers, parse_sites

__all__ = ["STORE_DTYPES", "LayerSelection", "CaptureSpec", "ResolvedCapture", "CaptureDifference", "capture_of",
           "describe_differences"]

#: The dtypes a capture may be stored in.
STORE_DTYPES = ("float16", "bfloat16", "float32")

# a layer count no model reaches: parsing a selection against it checks the syntax only
_ANY_DEPTH = 10**6


@dataclass(frozen=True)
class LayerSelection:
    """Which layers: ``all``, a list ``0,3,5``, a range ``2:6`` (python slice, end exclusive); negatives count
    from the end. Syntax is checked when made; the range against each model in :meth:`resolve`."""

    text: str = "all"

    @classmethod
    def parse(cls, spec: "str | Sequence[int] | LayerSelection") -> "LayerSelection":
        if isinstance(spec, LayerSelection):
            return spec
        if isinstance(spec, str):
            text = ",".join(p.strip() for p in spec.split(",")) if spec.strip() != "all" else "all"
        else:
            try:
                text = ",".join(str(int(x)) for x in spec)
            except (TypeError, ValueError):
                raise SiteError(f"layers {spec!r}: use all, a list like 0,3,5 or a range like 2:6") from None
        parse_layers(text, _ANY_DEPTH)
        return cls(text)

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """The layer indices for a model of ``n_layers`` (raises when one is out of its range)."""
        return parse_layers(self.text, n_layers)

    @property
    def fixed(self) -> tuple[int, ...] | None:
        """The indices when they need no model (a list of non-negative layers), else None."""
        if self.text == "all" or ":" in self.text or "-" in self.text:
            return None
        return tuple(dict.fromkeys(int(p) for p in self.text.split(",")))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class CaptureDifference:
    """One field in which two captures differ: ``have`` (a store's) against ``want`` (asked for)."""

    field: str
    have: Any
    want: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.have)} vs {_show(self.want)}"


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: sites x layers at the given positions, under a prompt template, stored in ``dtype``.

    ``sites``: names or a comma list (``resid_post``, ``mlp_out``, ``attn_out``, ``mlp_act``, ...);
    ``layers``: a :class:`LayerSelection` or its text; ``positions``: a :class:`Positions` or its text
    (``last``, ``last:k``, ``all``, ``from:MARKER``, ``post_instruction``); ``template``: a
    :class:`PromptTemplate` or its text (``none``, ``chat``, a format string with ``{text}``).
    """

    sites: tuple[str, ...] = ("resid_post",)
    layers: LayerSelection = field(default_factory=LayerSelection)
    positions: Positions = field(default_factory=lambda: Positions("last", 1))
    template: PromptTemplate = field(default_factory=PromptTemplate)
    dtype: str = "float16"
    compression: str | None = "zstd"

    def __post_init__(self) -> None:
        for name, parse in (("sites", parse_sites), ("layers", LayerSelection.parse), ("positions", Positions.parse),
                            ("template", PromptTemplate), ("dtype", _store_dtype)):
            try:
                object.__setattr__(self, name, parse(getattr(self, name)))
            except ValueError as e:
                e.field = name  # which field failed, for callers that point at the user's line (a sweep file)
                raise

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers.resolve(n_layers)

    def resolve(self, n_layers: int) -> "ResolvedCapture":
        """This spec for a model of ``n_layers`` layers (raises when a layer is out of its range)."""
        return ResolvedCapture(self.sites, self.resolve_layers(n_layers), self.positions, self.template,
                               self.dtype, self.compression, n_layers)

    def lacks(self, need: "CaptureSpec", n_layers: int | None = None) -> list[CaptureDifference]:
        """What a capture made with this spec lacks to serve ``need`` (see :meth:`ResolvedCapture.lacks`);
        without a model's ``n_layers``, layers are compared as selections (``all`` covers any)."""
        if n_layers is not None:
            return self.resolve(n_layers).lacks(need.resolve(n_layers))
        out = [d for d in ResolvedCapture(self.sites, (), self.positions, self.template, self.dtype,
                                          self.compression, None).lacks(need) if d.field != "layers"]
        a, b = self.layers.fixed, need.layers.fixed
        if self.layers.text != "all" and self.layers != need.layers and (a is None or b is None or not set(b) <= set(a)):
            out.append(CaptureDifference("layers", self.layers.text, need.layers.text))
        return out

    def describe(self) -> str:
        return (f"sites {','.join(self.sites)}, layers {self.layers}, positions {self.positions}, "
                f"template {self.template.spec}")


@dataclass(frozen=True)
class ResolvedCapture:
    """A :class:`CaptureSpec` resolved against a model: the layer indices and the model's layer count."""

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: Positions
    template: PromptTemplate
    dtype: str
    compression: str | None
    n_layers: int | None  # None for a store older than the record (its model's depth is not in it)

    def to_json(self) -> dict[str, Any]:
        """The store's ``capture`` attribute."""
        return {"sites": list(self.sites), "layers": list(self.layers), "positions": str(self.positions),
                "template": self.template.spec, "dtype": self.dtype, "compression": self.compression,
                "n_layers": self.n_layers}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | str) -> "ResolvedCapture":
        if isinstance(d, str):
            d = json.loads(d)
        try:
            return cls(parse_sites(d["sites"]), tuple(int(x) for x in d["layers"]), Positions.parse(d["positions"]),
                       PromptTemplate(d.get("template", "none")), str(d.get("dtype", "float16")),
                       d.get("compression", "zstd"), None if d.get("n_layers") is None else int(d["n_layers"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a capture record ({e}): {d!r}") from None

    def as_spec(self) -> CaptureSpec:
        return CaptureSpec(self.sites, self.layers, self.positions, self.template, self.dtype, self.compression)

    def differences(self, want: "ResolvedCapture | CaptureSpec") -> list[CaptureDifference]:
        """Every field in which ``want`` differs from this capture (a spec whose layers need a model's depth
        is resolved against this capture's own); the layer count only when both know it."""
        w = _resolved(want, self.n_layers)
        out = []
        for f in ("sites", "layers", "positions", "template", "dtype", "compression"):
            a, b = getattr(self, f), getattr(w, f) if w is not None else _unresolved(want, f)
            if b is _SKIP:
                continue
            if a != b:
                out.append(CaptureDifference(f, _plain(a), _plain(b)))
        if w is not None and None not in (self.n_layers, w.n_layers) and self.n_layers != w.n_layers:
            out.append(CaptureDifference("n_layers", self.n_layers, w.n_layers))
        return out

    def lacks(self, need: "ResolvedCapture | CaptureSpec") -> list[CaptureDifference]:
        """What a store holding this capture lacks to serve ``need``: sites or layers it did not capture, or
        other positions or template. The stored dtype and compression do not matter to a reader."""
        w = _resolved(need, self.n_layers)
        out = []
        sites = [s for s in need.sites if s not in self.sites]
        if sites:
            out.append(CaptureDifference("sites", list(self.sites), list(need.sites)))
        layers = w.layers if w is not None else _unresolved(need, "layers")
        if layers is not _SKIP and [x for x in layers if x not in self.layers]:
            out.append(CaptureDifference("layers", list(self.layers), list(layers)))
        for f in ("positions", "template"):
            if getattr(self, f) != getattr(need, f):
                out.append(CaptureDifference(f, _plain(getattr(self, f)), _plain(getattr(need, f))))
        return out


def describe_differences(diffs: Sequence[CaptureDifference], have: str = "stored", want: str = "this run") -> str:
    """``layers stored [0], this run [1], positions ...``: the differing fields of two captures, in one line."""
    return ", ".join(f"{d.field} {have} {_show(d.have)}, {want} {_show(d.want)}" for d in diffs)


def _store_dtype(d: str) -> str:
    if d not in STORE_DTYPES:
        raise ValueError(f"store dtype {d!r}: one of {', '.join(STORE_DTYPES)}")
    return d


def capture_of(attrs: Mapping[str, Any]) -> ResolvedCapture | None:
    """The capture a store group's attributes record (typed), or None when they hold none.

    Reads the ``capture`` record, and the three older forms: a JSON ``capture_spec`` string next to
    ``positions`` and ``template`` attributes, or only those two (a store written without a spec)."""
    rec = attrs.get("capture")
    if isinstance(rec, ResolvedCapture):
        return rec
    if rec is not None:
        return ResolvedCapture.from_json(rec)
    old = attrs.get("capture_spec")
    if old is not None:
        d = json.loads(old) if isinstance(old, str) else dict(old)
        d.setdefault("positions", attrs.get("positions") or "last")
        d.setdefault("template", attrs.get("template") or "none")
        if isinstance(d.get("layers"), str) or "layers" not in d:
            d["layers"] = []  # unknown: a bare record names no layer list
        d.setdefault("sites", ["resid_post"])
        return ResolvedCapture.from_json(d)
    if attrs.get("positions") is not None or attrs.get("template") is not None:
        return ResolvedCapture(("resid_post",), (), Positions.parse(attrs.get("positions") or "last"),
                               PromptTemplate(attrs.get("template") or "none"), "float32", None, None)
    return None


_SKIP = object()


def _resolved(x: "ResolvedCapture | CaptureSpec", n_layers: int | None) -> ResolvedCapture | None:
    if isinstance(x, ResolvedCapture):
        return x
    if n_layers is not None:
        return x.resolve(n_layers)
    return None


def _unresolved(spec: CaptureSpec, f: str) -> Any:
    """A spec's field where no layer count is known: layers only when they need none."""
    if f == "layers":
        fixed = spec.layers.fixed
        return _SKIP if fixed is None else fixed
    return getattr(spec, f)


def _plain(v: Any) -> Any:
    if isinstance(v, PromptTemplate):
        return v.spec
    if isinstance(v, Positions):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
