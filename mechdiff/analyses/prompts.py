"""The true/false statement prompt: few-shot "<statement> This statement is: TRUE/FALSE" lines, then the
statement to judge. Part of the studies' protocol (knowledge patching scores the next token after it), so it
lives with them; the embedded zoo trains its pair on the same format and imports it from here."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TRUTH_SUFFIX", "LABEL_WORDS", "truth_line", "truth_prompt"]

TRUTH_SUFFIX = " This statement is:"
LABEL_WORDS = ("FALSE", "TRUE")  # index by label


def truth_line(statement: str, label: int | bool) -> str:
    """One labelled example: the statement, the suffix and its label word."""
    return f"{statement}{TRUTH_SUFFIX} {LABEL_WORDS[int(label)]}"


def truth_prompt(statement: str, shots: Sequence[tuple[str, int | bool]] = ()) -> str:
    """Few-shot labelling prompt: one "<statement> This statement is: TRUE/FALSE" line per shot,
    then the statement to judge, ending in "This statement is:"."""
    lines = [truth_line(s, label) for s, label in shots]
    lines.append(statement + TRUTH_SUFFIX)
    return "\n".join(lines)
