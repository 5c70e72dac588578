"""``mechdiff analyze confidence``: registered on the ``analyze`` sub-app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechdiff.analyses.knowledge_cli import _findings_table, _out, group_from_options, man_help
from mechdiff.cli_common import EXPECTED, check_output_dir, fail

__all__ = ["register", "confidence"]


def confidence(
    base: Optional[str] = typer.Option(None, "--base", help="Base model: local directory or hub id (default: the embedded base)."),
    post: Optional[list[str]] = typer.Option(None, "--post", help="Post-trained model; repeat for several (default: the embedded post)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated short names, base first (default: base,post)."),
    texts: Optional[Path] = typer.Option(None, "--texts", "-t", help="CSV / JSON / JSONL of texts for the ablations (default: the embedded fact sentences)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text, if not one of the usual names."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Output directory; the study writes OUT/confidence/."),
    q: float = typer.Option(0.25, "-q", "--top-fraction", help="Fraction of neurons kept by output-weight norm."),
    n: int = typer.Option(10, "-n", "--candidates", help="Candidates: the n lowest-variance neurons among those."),
    layer: int = typer.Option(-1, help="MLP layer (negative counts from the end)."),
    controls: int = typer.Option(5, help="Draws of norm-matched random neurons for the control ablation."),
    limit: Optional[int] = typer.Option(None, help="Use at most this many texts."),
    seed: int = typer.Option(0, help="Seed for the control draws."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    token_budget: int = typer.Option(4096, help="Padded tokens per batch."),
    name: str = typer.Option("group", help="Name of the model group in the results."),
) -> None:
    """Do entropy neurons explain the confidence change? Last-layer MLP neurons compared across models.

    DESCRIPTION

    Per model, every neuron of the last MLP layer gets its output-weight norm and the variance over the
    vocabulary of the cosine between its write direction and each unembedding vector. Candidates: the top
    -q by norm, then the -n with the lowest variance (entropy neurons write large, vocabulary-neutral
    directions). Models of one architecture are compared by the IoU of their candidate sets. Each model's
    candidates are mean-ablated (activation set to its mean over the texts, at every position), and so are
    norm-matched random neurons as a control; the effect on next-token entropy and maximum probability is
    averaged over every token of the texts.

    OUTPUTS

    OUT/confidence/results.zarr  norm, logit variance, candidate flags per model and neuron; IoU matrix;
                                 entropy and max probability per model and condition.
    OUT/confidence/summary.json  every number: candidates, IoU, ablation effects with their spread.
    OUT/confidence/*.png         norm vs logit-variance scatter per model, IoU table.

    EXAMPLES

      mechdiff analyze confidence --out results
      mechdiff analyze confidence --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --texts texts.csv -q 0.25 -n 10

    EXIT STATUS

    0 on success, 2 on bad input (models of different architectures, bad -q / -n, an unreadable text file).
    """
    from mechdiff.analyses.confidence import ArchitectureMismatchError, run_confidence

    try:
        check_output_dir(out)  # before the ablations, not when their results are saved
        group = group_from_options(base, post, labels, name)
        if not 0 < q <= 1:
            raise ValueError(f"-q must be a fraction in (0, 1], got {q}")
        if n < 1:
            raise ValueError(f"-n must be at least 1, got {n}")
        text_arg = None
        if texts is not None:
            from mechdiff.engine.data import load_prompts

            load_prompts(texts, text_column=text_column)  # bad files fail before any model loads
            text_arg = texts
    except EXPECTED as e:
        fail(e)
    try:
        result = run_confidence(
            group, text_arg, out, q=q, n=n, layer=layer, controls=controls, text_column=text_column, limit=limit,
            seed=seed, device=device, dtype=dtype, token_budget=token_budget,
        )
    except (ArchitectureMismatchError, *EXPECTED) as e:
        fail(e)
    _out.print(_findings_table(result))
    _out.print(f"results: {out / 'confidence'}")


def register(analyze_app: typer.Typer) -> None:
    """Add ``confidence`` to the ``analyze`` sub-app."""
    analyze_app.command("confidence", help=man_help(confidence.__doc__))(confidence)
