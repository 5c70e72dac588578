"""Hook sites: capture and intervention on the HF modules, as plain PyTorch forward hooks.

Sites (TransformerLens-like names):

``resid_pre``   input of decoder block l            (width d_model)
``resid_post``  output of decoder block l           (width d_model)
``attn_out``    what attention adds to the residual (width d_model)
``mlp_out``     what the MLP adds to the residual   (width d_model)
``mlp_act``     neuron activations, the down projection's input (width d_mlp)

Everything is installed by the ``hooks`` context manager and removed on exit, exceptions included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from mechdiff.errors import MechdiffError
from mechdiff.engine.adapter import ArchAdapter, hidden_from_output, replace_hidden_in_output

__all__ = [
    "SITES",
    "SiteError",
    "Intervention",
    "PositionIntervention",
    "Add",
    "ProjectOut",
    "MeanAblate",
    "Replace",
    "Capture",
    "hooks",
    "mlp_only_at",
    "site_width",
    "parse_sites",
    "parse_layers",
]

SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act")


class SiteError(MechdiffError, ValueError):
    """An unknown site or a layer out of range."""


def parse_sites(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise SiteError("no site given: choose from " + ", ".join(SITES))
    for n in names:
        if n not in SITES:
            raise SiteError(f"unknown site {n!r}: choose from " + ", ".join(SITES))
    return tuple(dict.fromkeys(names))


def parse_layers(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """``all``, ``0,3,5``, ``2:6`` (python slice, end exclusive), negatives count from the end."""
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return tuple(range(n_layers))
        out: list[int] = []
        for part in s.split(","):
            part = part.strip()
            try:
                if ":" in part:
                    a, b = part.split(":", 1)
                    out.extend(range(n_layers)[slice(int(a) if a else None, int(b) if b else None)])
                else:
                    out.append(int(part))
            except ValueError:
                raise SiteError(f"layers {spec!r}: use all, a list like 0,3,5 or a range like 2:6") from None
        layers = out
    else:
        layers = [int(x) for x in spec]
    fixed = []
    for l in layers:
        if not -n_layers <= l < n_layers:
            raise SiteError(f"layer {l} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        fixed.append(l % n_layers)
    if not fixed:
        raise SiteError(f"layers {spec!r} selects no layer")
    return tuple(dict.fromkeys(fixed))


def site_width(adapter: ArchAdapter, site: str) -> int:
    return adapter.d_mlp if site == "mlp_act" else adapter.d_model


@dataclass
class Intervention:
    """A change to one site at one layer: the base of an open family. A subclass says what it does to an
    activation in :meth:`apply`; the hooks call it on every forward pass the site sees.

    ``rows`` (a ``slice`` of the batch, keyword): act on those batch rows only, as if they were a batch of their
    own, so one forward pass can run several conditions stacked along the batch (positions and per-row values
    then count rows within the slice).
    """

    site: str
    layer: int
    rows: slice | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise SiteError(f"unknown site {self.site!r}: choose from " + ", ".join(SITES))
        if self.rows is not None:
            r = self.rows
            if not (isinstance(r, slice) and r.step in (None, 1) and isinstance(r.start, int)
                    and isinstance(r.stop, int) and 0 <= r.start < r.stop):
                raise ValueError(f"intervention rows {r!r}: a slice(start, stop) of batch rows, 0 <= start < stop")

    @property
    def every_position(self) -> bool:
        """True when it acts the same on every position (so it also steers the steps of a generation)."""
        return True

    @property
    def prompt_only(self) -> bool:
        return False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The modified activation ``x`` ([batch, seq, width]); never writes into ``x``."""
        raise NotImplementedError(f"{type(self).__name__} does not say what it does to an activation")


@dataclass
class PositionIntervention(Intervention):
    """An intervention computed from the activation itself, at chosen positions or at all of them.

    ``index`` ([batch, n] sequence indices, -1 = leave alone) restricts it to those positions; None means every
    position the forward pass sees (so generation steps are covered too). ``prompt_only``: act on forward
    passes over more than one token (a prompt, or the prefill of cached generation) and leave single-token
    decode steps alone, so a steered prompt is continued by the model's own dynamics.
    """

    index: torch.Tensor | None = field(default=None, kw_only=True)
    prompt_only: bool = field(default=False, kw_only=True)

    @property
    def every_position(self) -> bool:
        return self.index is None

    def changed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` changed at every position; :meth:`apply` keeps the change where ``index`` says."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_only and x.shape[1] == 1:  # a decode step of cached generation
            return x
        new = self.changed(x)
        if self.index is None:
            return new
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        b, n = self.index.shape
        rows = torch.arange(b, device=x.device)[:, None].expand(b, n)
        ok = self.index >= 0
        mask[rows[ok], self.index[ok]] = True
        return torch.where(mask[..., None], new, x)


@dataclass
class Add(PositionIntervention):
    """``x + coef * vector`` (vector: [width]): steering, e.g. adding a refusal or truth direction."""

    vector: torch.Tensor = None
    coef: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vector is None:
            raise ValueError("Add needs a vector")

    def changed(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.coef * self.vector.to(device=x.device, dtype=x.dtype)


@dataclass
class ProjectOut(PositionIntervention):
    """``x - (x . d) d`` with ``d = vector / |vector|``: directional ablation."""

    vector: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vector is None:
            raise ValueError("ProjectOut needs a vector")

    def changed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vector.to(device=x.device, dtype=x.dtype)
        d = v / v.norm()
        return x - (x @ d)[..., None] * d


@dataclass
class MeanAblate(PositionIntervention):
    """The activation set to a fixed ``mean`` ([width]), or only the ``units`` given (e.g. neurons of
    ``mlp_act``) set to ``mean`` ([len(units)]): mean ablation."""

    mean: torch.Tensor = None
    units: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mean is None:
            raise ValueError("MeanAblate needs a mean")
        self.mean = torch.as_tensor(self.mean)
        if self.units is not None:
            self.units = torch.as_tensor(self.units, dtype=torch.long)
            if self.mean.shape[-1:] != self.units.shape:
                raise ValueError(f"MeanAblate: {len(self.units)} units but a mean of shape {tuple(self.mean.shape)}")

    def changed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mean.to(device=x.device, dtype=x.dtype)
        if self.units is None:
            return m.expand_as(x).clone()
        out = x.clone()
        out[..., self.units.to(x.device)] = m
        return out


@dataclass
class Replace(Intervention):
    """``x[b, index[b, j]] = values[b, j]`` (values: [batch, n, width]): activation patching."""

    values: torch.Tensor = None
    index: torch.Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.values is None or self.index is None:
            raise ValueError("Replace needs values and index")

    @property
    def every_position(self) -> bool:
        return False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        b, n = self.index.shape
        rows = torch.arange(b, device=x.device)[:, None].expand(b, n)
        ok = self.index >= 0
        out[rows[ok], self.index[ok]] = self.values.to(x.dtype)[ok]
        return out


@dataclass
class Capture:
    """Activations captured during one forward pass.

    ``index`` is ``[batch, n]`` sequence indices (``-1`` = empty slot, filled with NaN) or None for every
    position. ``acts[(site, layer)]`` holds a fresh ``[batch, n, width]`` tensor (a gather, so it never aliases
    memory a later kernel reuses), sliced and cast to ``dtype`` on the device that computed it, then moved to
    ``to_device`` (default: stay there). A GPU-to-host move goes into pinned memory without blocking, so no
    hooked layer waits for the host; call :meth:`wait` before reading the values on the host. Nothing here
    syncs with the device, so a model split over several GPUs runs as it would without the hooks.
    """

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    index: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    to_device: torch.device | str | None = None
    acts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _index_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def take(self, site: str, layer: int, x: torch.Tensor) -> None:
        x = x.detach()
        if self.index is None:
            moving = self.to_device is not None and torch.device(self.to_device) != x.device
            if self.dtype is not None and x.dtype != self.dtype:
                out = x.to(self.dtype)
            else:
                out = x if moving else x.clone()  # a move copies already; never keep a view of x
        else:
            if x.device not in self._index_on:  # once per device a layer lives on, not once per layer
                idx = self.index.to(x.device)
                self._index_on[x.device] = (idx.clamp(min=0)[..., None], (idx < 0)[..., None])
            safe, empty = self._index_on[x.device]
            out = torch.gather(x, 1, safe.expand(-1, -1, x.shape[-1]))
            if self.dtype is not None and out.dtype != self.dtype:
                out = out.to(self.dtype)
            out.masked_fill_(empty, float("nan"))  # empty slots: no host check of whether there are any
        self.acts[(site, layer)] = _move(out, self.to_device)

    def stacked(self, site: str) -> torch.Tensor:
        """``[batch, layer, n, width]`` for one site over the captured layers, gathered onto one device (the
        output device, else the first layer's) when the layers' captures live on several."""
        parts = [self.acts[(site, l)] for l in self.layers]
        dev = torch.device(self.to_device) if self.to_device is not None else parts[0].device
        return torch.stack([p if p.device == dev else p.to(dev) for p in parts], dim=1)

    def wait(self) -> None:
        """Block until every capture's non-blocking copy to the host has landed."""
        if any(t.is_pinned() for t in self.acts.values()):
            torch.cuda.synchronize()


def _move(t: torch.Tensor, to: torch.device | str | None) -> torch.Tensor:
    if to is None:
        return t
    to = torch.device(to)
    if t.device == to:
        return t
    if t.device.type == "cuda" and to.type == "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return host.copy_(t, non_blocking=True)
    return t.to(to)


def _module_for(adapter: ArchAdapter, site: str, layer: int) -> tuple[torch.nn.Module, str]:
    """The module to hook and how: 'out' (forward output) or 'in' (forward input)."""
    if site == "resid_post":
        return adapter.layer(layer), "out"
    if site == "resid_pre":
        return adapter.layer(layer), "in"
    if site == "attn_out":
        return adapter.attn_out_module(layer), "out"
    if site == "mlp_out":
        return adapter.mlp_out_module(layer), "out"
    if site == "mlp_act":
        return adapter.down_proj(layer), "in"
    raise SiteError(f"unknown site {site!r}: choose from " + ", ".join(SITES))


def _input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _with_input_hidden(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


@contextlib.contextmanager
def hooks(
    adapter: ArchAdapter,
    capture: Capture | None = None,
    interventions: Sequence[Intervention] = (),
) -> Iterator[Capture | None]:
    """Install capture and intervention hooks for the duration of the block.

    Interventions at a site run before its capture, so a capture sees the modified activation.
    """
    plan: dict[tuple[str, int], tuple[list[Intervention], bool]] = {}
    for iv in interventions:
        if not 0 <= iv.layer < adapter.n_layers:
            raise SiteError(f"layer {iv.layer} is out of range: the model has {adapter.n_layers} layers")
        plan.setdefault((iv.site, iv.layer), ([], False))[0].append(iv)
    if capture is not None:
        for site in capture.sites:
            if site not in SITES:
                raise SiteError(f"unknown site {site!r}: choose from " + ", ".join(SITES))
            for l in capture.layers:
                if not 0 <= l < adapter.n_layers:
                    raise SiteError(f"layer {l} is out of range: the model has {adapter.n_layers} layers")
                ivs, _ = plan.get((site, l), ([], False))
                plan[(site, l)] = (ivs, True)

    handles = []
    try:
        for (site, layer), (ivs, cap) in plan.items():
            module, where = _module_for(adapter, site, layer)
            if where == "out":
                handles.append(module.register_forward_hook(_out_hook(site, layer, ivs, capture if cap else None)))
            else:
                handles.append(
                    module.register_forward_pre_hook(
                        _in_hook(site, layer, ivs, capture if cap else None), with_kwargs=True
                    )
                )
        yield capture
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def mlp_only_at(adapter: ArchAdapter, layer: int, index: torch.Tensor) -> Iterator[None]:
    """Run block ``layer``'s MLP only at the positions of ``index`` (``[batch, n]`` sequence indices, ``-1`` =
    none) for the duration of the block; elsewhere the MLP adds zero to the residual.

    For the deepest block a forward pass needs, when all that is read of it is its output at those positions
    (a last-token capture): the MLP is position-wise, so those positions come out as they would without this,
    and the MLP, about two thirds of a block's work, runs on n positions instead of the whole sequence. Every
    other position of that block's output is then wrong: nothing may read it.
    """
    mlp = adapter.mlp_module(layer)
    slots: dict[str, torch.Tensor] = {}

    def gather(module, args, kwargs):
        x = _input_hidden(args, kwargs)
        safe = index.to(x.device).clamp(min=0)[..., None].expand(-1, -1, x.shape[-1])  # an empty slot reads 0
        slots["safe"], slots["seq"] = safe, x.shape[1]
        return _with_input_hidden(args, kwargs, torch.gather(x, 1, safe))

    def scatter(module, args, output):
        y = hidden_from_output(output)  # [batch, n, width]
        full = y.new_zeros(y.shape[0], slots["seq"], y.shape[-1])
        # duplicate targets (an empty slot and position 0) carry the same value, so the scatter is exact
        return replace_hidden_in_output(output, full.scatter_(1, slots["safe"].to(y.device), y))

    handles = [mlp.register_forward_pre_hook(gather, with_kwargs=True), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _apply_all(ivs: Sequence[Intervention], x: torch.Tensor) -> torch.Tensor:
    """``ivs`` applied in order to ``x`` ([batch, seq, width]). Row-restricted ones act on their slice only: the
    batch is cut at every slice boundary, each piece gets the interventions that cover it (in order) exactly as a
    batch of its own would, and the pieces are joined again."""
    if all(iv.rows is None for iv in ivs):
        for iv in ivs:
            x = iv.apply(x)
        return x
    n = x.shape[0]
    for iv in ivs:
        if iv.rows is not None and iv.rows.stop > n:
            raise ValueError(f"intervention rows {iv.rows!r} reach past the batch of {n} rows")
    cuts = sorted({0, n, *(b for iv in ivs if iv.rows is not None for b in (iv.rows.start, iv.rows.stop))})
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        piece = x[a:b]
        for iv in ivs:
            if iv.rows is None or (iv.rows.start <= a and b <= iv.rows.stop):
                piece = iv.apply(piece)
        pieces.append(piece)
    return torch.cat(pieces)


def _out_hook(site: str, layer: int, ivs: list[Intervention], cap: Capture | None):
    def hook(module, args, output):
        x = hidden_from_output(output)
        changed = bool(ivs)
        if changed:
            x = _apply_all(ivs, x)
        if cap is not None:
            cap.take(site, layer, x)
        return replace_hidden_in_output(output, x) if changed else None

    return hook


def _in_hook(site: str, layer: int, ivs: list[Intervention], cap: Capture | None):
    def hook(module, args, kwargs):
        x = _input_hidden(args, kwargs)
        changed = bool(ivs)
        if changed:
            x = _apply_all(ivs, x)
        if cap is not None:
            cap.take(site, layer, x)
        return _with_input_hidden(args, kwargs, x) if changed else None

    return hook
