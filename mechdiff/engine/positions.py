"""Position selectors, always counted from each example's own end so padding never shifts them.

A selector resolves, for a padded batch, to an index tensor ``[batch, n_positions]`` into the sequence
dimension; ``-1`` marks a slot an example does not have (a short example under ``all``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.errors import MechdiffError

__all__ = ["Positions", "PositionError", "example_ends", "find_marker_start"]


class PositionError(MechdiffError, ValueError):
    """A position selector that is malformed or cannot be resolved for an example."""


@dataclass(frozen=True)
class Positions:
    """Which token positions to keep.

    ``last``           the final token
    ``last:k``         the final k tokens
    ``all``            every token (examples shorter than the longest are padded, masked by ``n_tokens``)
    ``from:MARKER``    the tokens from the start of the last occurrence of MARKER to the end, e.g. the
                       post-instruction tokens of a chat template (MARKER = the template text after the
                       instruction)
    ``post_instruction`` the same, with MARKER taken from the model's chat template
    """

    kind: str
    k: int = 1
    marker: str | None = None

    @classmethod
    def parse(cls, spec: "str | Positions") -> "Positions":
        if isinstance(spec, Positions):
            return spec
        s = spec.strip()
        if s == "last":
            return cls("last", 1)
        if s.startswith("last:"):
            try:
                k = int(s[5:])
            except ValueError:
                raise PositionError(f"positions {spec!r}: 'last:k' needs a whole number k, e.g. last:4") from None
            if k < 1:
                raise PositionError(f"positions {spec!r}: k must be at least 1")
            return cls("last", k)
        if s == "all":
            return cls("all", 0)
        if s.startswith("from:") and len(s) > 5:
            return cls("from", 0, s[5:])
        if s == "post_instruction":
            return cls("post_instruction", 0)
        raise PositionError(
            f"unknown positions {spec!r}: use last, last:k, all, from:MARKER or post_instruction"
        )

    def __str__(self) -> str:
        if self.kind == "last":
            return "last" if self.k == 1 else f"last:{self.k}"
        if self.kind == "from":
            return f"from:{self.marker}"
        return self.kind

    @property
    def keeps_position_dim(self) -> bool:
        """``last`` stores no position dim; every other selector does."""
        return not (self.kind == "last" and self.k == 1)

    def counts(self, token_ids: list[list[int]], marker_ids: list[int] | None = None) -> list[int]:
        """Number of kept positions per example (before padding to a common width)."""
        if self.kind == "last":
            out = []
            for i, ids in enumerate(token_ids):
                if len(ids) < self.k:
                    raise PositionError(f"example {i} has {len(ids)} tokens, fewer than last:{self.k}")
                out.append(self.k)
            return out
        if self.kind == "all":
            return [len(ids) for ids in token_ids]
        if not marker_ids:
            raise PositionError(f"positions {self}: the marker has no tokens to look for")
        out = []
        for i, ids in enumerate(token_ids):
            start = find_marker_start(ids, marker_ids)
            if start < 0:
                raise PositionError(
                    f"example {i}: marker {self.marker!r} (token ids {marker_ids}) not found in its tokens"
                )
            out.append(len(ids) - start)
        return out


def find_marker_start(ids: list[int], marker_ids: list[int]) -> int:
    """Start index of the last occurrence of ``marker_ids`` in ``ids``, or -1."""
    m = len(marker_ids)
    for s in range(len(ids) - m, -1, -1):
        if ids[s : s + m] == marker_ids:
            return s
    return -1


def example_ends(attention_mask: torch.Tensor) -> torch.Tensor:
    """One past the index of each row's last real token; works for left and right padding."""
    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values + 1


def gather_index(attention_mask: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """Index ``[batch, width]`` of the last ``width`` slots counted from each end; ``-1`` where an example
    keeps fewer than ``width`` positions (``counts[b]`` kept)."""
    ends = example_ends(attention_mask)  # [B]
    offs = torch.arange(-width, 0, device=attention_mask.device)  # -width .. -1
    idx = ends[:, None] + offs[None, :]
    valid = offs[None, :] >= -counts[:, None]
    return torch.where(valid, idx, torch.full_like(idx, -1))
