"""``mechdiff analyze confidence``: registered on the ``analyze`` sub-app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechdiff.analyses.knowledge_cli import _findings_table, _out, group_from_options, man_help
from mechdiff.cli_common import EXPECTED, check_output_dir, fail

__all__ = ["register", "confidence", "embedded_texts"]


def embedded_texts() -> list[str]:
    """The embedded fact sentences, the default of ``--texts``."""
    from mechdiff.zoo.datasets import fact_sentences

    try:
        return fact_sentences()
    except FileNotFoundError as e:
        raise ValueError(f"no --texts given and the embedded facts are not available ({e})") from None


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
    controls: int = typer.Option(20, help="Draws of norm-matched random neurons for the control ablation and the patching control (the verdicts need at least 20 to place a 95% range)."),
    weight_processing: str = typer.Option("transformer_lens", "--weight-processing", help="transformer_lens: fold the final norm's gain into W_U and centre it, as TransformerLens and the paper do; none: the raw lm_head."),
    iou_draws: int = typer.Option(1000, help="Random neuron sets drawn for the IoU baselines."),
    bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples of the texts for the explained-fraction interval."),
    patch: bool = typer.Option(True, "--patch/--no-patch", help="Patch the candidates' activations between the models to test whether they carry the confidence change."),
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
    vocabulary of the cosine between its write direction and each unembedding vector, on weights processed as
    TransformerLens does (--weight-processing transformer_lens: the final norm's gain folded into W_U, W_U
    centred over the vocabulary; the paper's weights). Candidates: the top -q by norm, then the -n with the
    lowest variance. Each model's candidates are mean-ablated (activation set to its mean over the texts, at
    every position), and so are --controls sets of norm-matched random neurons: the candidates count as entropy
    neurons only if their mean |entropy change| per token beats the controls' 95% quantile.

    "Entropy neurons shared": the candidate IoU between models (with its range over q/2, q, 1.5q) must beat
    the IoU of extreme-ranked sets of the same size (top-n by norm, top-n by highest variance) and of random
    sets from the top-q by norm, and the candidates must be entropy neurons in both models. "Entropy neurons do
    not explain the confidence change" (with --patch): the candidates' activations are patched from one model
    into the other, and the fraction of the entropy change that moves with them (bootstrap interval over the
    texts) is compared with norm-matched random sets.

    OUTPUTS

    OUT/confidence/results.zarr  norm, logit variance, candidate flags per model and neuron; IoU matrix and
                                 baselines; entropy and max probability per model and condition; explained
                                 fractions per pair and direction.
    OUT/confidence/summary.json  every number: candidates, IoU, baselines, ablation effects and controls,
                                 explained fractions, the weight processing used, the findings' verdicts.
    OUT/confidence/*.png         norm vs logit-variance scatter per model, IoU table, Venn diagram of the
                                 candidate sets.

    EXAMPLES

      mechdiff analyze confidence --out results
      mechdiff analyze confidence --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --texts texts.csv -q 0.25 -n 10

    EXIT STATUS

    0 on success, 2 on bad input (models of different architectures, bad -q / -n, an unreadable text file).
    """
    from mechdiff.analyses.confidence import WEIGHT_PROCESSING, ArchitectureMismatchError, run_confidence

    try:
        check_output_dir(out)  # before the ablations, not when their results are saved
        group = group_from_options(base, post, labels, name)
        if not 0 < q <= 1:
            raise ValueError(f"-q must be a fraction in (0, 1], got {q}")
        if n < 1:
            raise ValueError(f"-n must be at least 1, got {n}")
        if weight_processing not in WEIGHT_PROCESSING:
            raise ValueError(f"--weight-processing {weight_processing!r}: one of {', '.join(WEIGHT_PROCESSING)}")
        for flag, v in (("--controls", controls), ("--iou-draws", iou_draws), ("--bootstrap", bootstrap)):
            if v < 1:
                raise ValueError(f"{flag} must be at least 1, got {v}")
        if texts is not None:
            from mechdiff.engine.data import load_prompts

            load_prompts(texts, text_column=text_column)  # bad files fail before any model loads
            text_arg = texts
        else:
            text_arg = embedded_texts()
    except EXPECTED as e:
        fail(e)
    try:
        result = run_confidence(
            group, text_arg, out, q=q, n=n, layer=layer, controls=controls, text_column=text_column, limit=limit,
            seed=seed, device=device, dtype=dtype, token_budget=token_budget, weight_processing=weight_processing,
            iou_draws=iou_draws, n_bootstrap=bootstrap, patch=patch,
        )
    except (ArchitectureMismatchError, *EXPECTED) as e:
        fail(e)
    _out.print(_findings_table(result))
    _out.print(f"results: {out / 'confidence'}")


def register(analyze_app: typer.Typer) -> None:
    """Add ``confidence`` to the ``analyze`` sub-app."""
    analyze_app.command("confidence", help=man_help(confidence.__doc__))(confidence)
