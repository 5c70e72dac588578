"""``mechdiff analyze knowledge``: registered on the ``analyze`` sub-app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mechdiff.cli_common import EXPECTED, check_output_dir, fail

__all__ = ["register", "knowledge", "group_from_options", "embedded_pairs", "man_help"]

_out = Console()


def man_help(doc: str | None) -> str:
    """A docstring as man-page-like help: prose paragraphs re-flowed to the terminal (typer's rich mode keeps
    every source line break), headings and indented or column-aligned blocks kept as written."""
    import inspect

    out = []
    for para in inspect.cleandoc(doc or "").split("\n\n"):
        lines = para.split("\n")
        verbatim = any(ln.startswith(" ") or "   " in ln for ln in lines)
        out.append(para if verbatim or len(lines) == 1 else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def group_from_options(base: Optional[str], post: Optional[list[str]], labels: Optional[str], name: str):
    """The model group from --base/--post/--labels; the embedded pair when neither model is given."""
    from mechdiff.analyses.common import ModelGroup

    if base is None and not post:
        from mechdiff.zoo.paths import zoo_path

        try:
            base, post = str(zoo_path("base")), [str(zoo_path("post"))]
        except FileNotFoundError as e:
            raise ValueError(f"no --base/--post given and the embedded pair is not available ({e})") from None
    if base is None or not post:
        raise ValueError("give both --base and at least one --post (or neither, for the embedded pair)")
    labs = tuple(x.strip() for x in labels.split(",")) if labels else ()
    return ModelGroup(name, base, tuple(post), labs)


def embedded_pairs() -> Path:
    """The embedded pair's patching.csv (its shots.json beside it), the default of ``--pairs``."""
    from mechdiff.zoo.paths import zoo_path

    try:
        return zoo_path("data") / "patching.csv"
    except FileNotFoundError as e:
        raise ValueError(f"no --pairs given and the embedded pairs are not available ({e})") from None


def _findings_table(result) -> Table:
    t = Table(title=f"{result.study}: findings", title_justify="left")
    for c in ("finding", "pair", "verdict", "controls", "detail"):
        t.add_column(c, overflow="fold")
    for f in result.findings:
        ctl = "\n".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in f.controls.items())
        t.add_row(f.finding, f.pair, f.verdict, ctl, f"{f.reason}; {f.detail}" if f.reason else f.detail)
    return t


def knowledge(
    base: Optional[str] = typer.Option(None, "--base", help="Base model: local directory or hub id (default: the embedded base)."),
    post: Optional[list[str]] = typer.Option(None, "--post", help="Post-trained model; repeat for several (default: the embedded post)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated short names, base first (default: base,post)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", "-p", help="CSV with columns true_statement, false_statement, true_answer, false_answer, topic (default: the embedded patching.csv)."),
    shots: str = typer.Option("auto", "--shots", help="Few-shot examples: auto (a shots.json next to --pairs), none, or a shots.json path."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Output directory; the study writes OUT/knowledge/."),
    sites: str = typer.Option("resid_post,attn_out,mlp_out", help="Comma-separated sites to patch: resid_pre, resid_post, attn_out, mlp_out, mlp_act."),
    layers: str = typer.Option("all", help="all, a list 0,3,5, or a range 2:6 (end exclusive)."),
    cross: bool = typer.Option(True, "--cross/--no-cross", help="Also patch the base model's activations into each post model, and each post model's into the base model."),
    attribution: bool = typer.Option(True, "--attribution/--no-attribution", help="Also compute attribution-patching estimates."),
    attribution_method: str = typer.Option("ig", "--attribution-method", help="atp (gradient x difference), atp+qk, atp+gd, atp* (Kramar et al.'s corrections) or ig (integrated gradients, 5 steps); its r against exact patching is reported."),
    limit: Optional[int] = typer.Option(None, help="At most this many pairs, spread over topics."),
    positions: str = typer.Option("statement", help="statement (leave the few-shot context unpatched) or all."),
    min_gap: float = typer.Option(0.1, help="Leave out of the normalised statistics pairs with logit-diff(true) - logit-diff(false) <= this."),
    normalisation: str = typer.Option("logit", help="Patching effect per pair: logit = (LD_patched - LD_false) / (LD_true - LD_false), LD = logit(TRUE) - logit(FALSE) (0 = false run, 1 = true run); paper = Du et al.'s (PD_patched - PD_false) / (1 - PD_false), PD = P(TRUE) - P(FALSE) (0 = false run, 1 = certain TRUE)."),
    control_model: Optional[str] = typer.Option(None, "--control-model", help="An unrelated model of the same tokenizer (local directory or hub id): its heatmap's correlation with the base model's is the control a 'storage unchanged' verdict must clear."),
    n_permutations: int = typer.Option(200, help="Seeded permuted heatmaps (layers within each position slot, slots within each role) for the chance correlation."),
    n_bootstrap: int = typer.Option(200, help="Seeded resamples of the pairs (within topic) for the 95% intervals."),
    seed: int = typer.Option(0, help="Seed of the permutations, resamples and split halves."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    token_budget: int = typer.Option(8192, help="Rows x tokens per batched pass."),
    name: str = typer.Option("group", help="Name of the model group in the results."),
) -> None:
    """Where are facts stored, and did post-training move them? Activation patching over layer x position.

    DESCRIPTION

    For each pair of a true and a false statement of equal token length, the false prompt ("<shots>
    <statement> This statement is:") is run with one activation (SITE, layer, token position) replaced by
    the true prompt's, and the change in logit(TRUE answer) - logit(FALSE answer) at the last token is
    normalised per pair: 0 = the false run, 1 = the true run (--normalisation logit), or the paper's
    (PD_patched - PD_false) / (1 - PD_false) with PD = P(TRUE) - P(FALSE) (--normalisation paper). Every
    model of the group is swept on its own; with --cross, the base model's true-prompt activations are also
    patched into each post model's false runs, and each post model's into the base model's. Positions are
    grouped by role and averaged over pairs: where the pairs file names the spans (columns subject and
    true_object / false_object, as the embedded file does; pairs may change the subject, the paper's design,
    or the object), context, subject, object, final (after the object) and other; else context, subject
    (before the differing span), object (the differing span) and final. By default only the statement's
    tokens are patched (--positions statement): within a model the few-shot context cannot change, across
    models patching it is most of the work and says little about where the facts are.

    The verdict ("knowledge storage unchanged") is decided against controls computed in the same run: a
    bootstrap 95% interval over pairs on the base-vs-post heatmap correlation, a null from permuted heatmaps,
    the split-half reliability of each heatmap (its ceiling), cross-model patching in both directions, and,
    with --control-model, an unrelated model's correlation with the base heatmap. It is inconclusive when a
    model does not tell the pairs apart (e.g. a random-init model) or a heatmap does not reproduce itself.

    The exact sweep resumes each patch from the cached residual stream, recomputes only the suffix a patch
    can affect, and batches all variants; it equals one full forward per variant to fp32 precision.

    OUTPUTS

    OUT/knowledge/results.zarr   effect per run, site, pair, layer, position; mean / std heatmaps on role
                                 slots; differences between models; attribution estimates.
    OUT/knowledge/summary.json   every number: heatmap correlations and their controls, cross-model effect,
                                 peak layers, max |difference| per token group, timings.
    OUT/knowledge/*.png          heatmaps side by side with their 20-bin difference (the paper's Figure 1a);
                                 attribution vs exact.

    EXAMPLES

      mechdiff analyze knowledge --out results
      mechdiff analyze knowledge --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct --pairs pairs.csv --device cuda
      mechdiff analyze knowledge --normalisation paper --control-model path/to/unrelated-model --out results

    EXIT STATUS

    0 on success, 2 on bad input (pairs of unequal token length, models with different tokenizers, ...).
    """
    from mechdiff.analyses.knowledge import (
        NORMALISATIONS,
        KnowledgeControls,
        KnowledgeOptionError,
        PairError,
        load_pairs,
        run_knowledge,
    )
    from mechdiff.engine.patching import ModelMismatchError
    from mechdiff.engine.sites import SiteError, parse_sites

    try:
        check_output_dir(out)  # before the sweep, not when its results are saved
        group = group_from_options(base, post, labels, name)
        parse_sites(sites)
        if positions not in ("statement", "all"):
            raise ValueError(f"--positions {positions!r}: statement or all")
        if normalisation not in NORMALISATIONS:
            raise KnowledgeOptionError(f"--normalisation {normalisation!r}: one of {', '.join(NORMALISATIONS)}")
        controls = KnowledgeControls(n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed)
        shots_arg = None if shots == "none" else shots
        pairs = embedded_pairs() if pairs is None else pairs
        load_pairs(pairs)  # bad files fail before any model loads
    except EXPECTED as e:
        fail(e)
    try:
        result = run_knowledge(
            group, pairs, out, shots=shots_arg, sites=tuple(s.strip() for s in sites.split(",") if s.strip()),
            layers=layers, cross=cross, attribution=attribution, attribution_method=attribution_method, limit=limit, positions=positions, min_gap=min_gap,
            device=device, dtype=dtype, token_budget=token_budget, normalisation=normalisation,
            control_model=control_model, controls=controls,
        )
    except (PairError, ModelMismatchError, SiteError, *EXPECTED) as e:
        fail(e)
    _out.print(_findings_table(result))
    _out.print(f"results: {out / 'knowledge'}")


def register(analyze_app: typer.Typer) -> None:
    """Add ``knowledge`` to the ``analyze`` sub-app."""
    analyze_app.command("knowledge", help=man_help(knowledge.__doc__))(knowledge)
