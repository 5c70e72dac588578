"""``mechdiff analyze refusal``: the refusal study from the command line (wired in by ``register``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mechdiff.cli_common import EXPECTED, check_output_dir, fail

__all__ = ["register", "read_phrases"]

HELP = """Find each model's refusal direction; test whether base and post-trained
models share it.

\b
WHAT IT DOES
  1. Extracts (resumable) both models' residual stream at every layer and
     post-instruction position for HARMFUL and HARMLESS instructions, each
     model in its own template (base: "User: {text}\\nAssistant:"; post: its
     chat template) and in its partner's (for the template-matched
     comparison), into STORE.
  2. Candidates: mean(harmful) - mean(harmless) per (layer, position), on
     the train rows.
  3. Greedy completions of the test rows, unsteered: a model that does not
     refuse harmful prompts more often than harmless ones (bootstrap 95%
     interval above 0) is not searched for a direction and not steered.
     Then, for each model that refuses,
     chooses the (layer, position) on validation rows: drop of the refusal
     token log-odds with the direction ablated (harmful prompts) plus its
     rise with the direction added (harmless prompts); the RERANK best are
     re-scored by the refusal score of greedy validation completions, which
     also picks the addition coefficient (--addition-coef). The last
     SKIP-LAST fraction of layers is never chosen.
  4. Cosine between the models' directions, per layer and chosen ones.
  5. Greedy generation on test rows. Refusal score = share of completions
     containing a refusal phrase: plain, with a direction ablated at every
     layer (harmful prompts), with it added at its layer (harmless
     prompts; --addition-scope prompt: at the prompt's positions, all:
     at every generated token too), times the target model's chosen
     coefficient; each model's own direction and the other model's
     (transferred): base -> post and post -> base.
  6. The verdict, against controls of the same run: "inconclusive" when a
     model does not refuse or its own direction does not lower its refusal;
     otherwise from the template-matched cosines (both models under the
     base template, and under the post template), each against a
     shuffled-label null and a split-half ceiling: all clearly below the
     ceiling -> "agrees" (the weights differ); all at the ceiling ->
     "disagrees" (the reason says when the own-template cosine is low only
     because of the template); else "inconclusive".

\b
THE PAPER'S RECIPE
  --match prefix --addition-unit --addition-scope all --kl-max 0.1
  (prefix-matched refusal phrases; the unit direction times the
  coefficient added at every position; Arditi et al.'s KL filter).

\b
SPLITS
  A "split" column (train / val / test) is used when present; missing
  splits are drawn from the train rows at random (N-VAL, N-EVAL, --seed).

\b
OUTPUT
  OUT/refusal/summary.json   every number, the findings, every completion
  OUT/refusal/results.zarr   directions, selection scores, cosines, scores
  OUT/refusal/*.png          cosine by layer, refusal scores, selection
  STORE                      activations (default OUT/store.zarr)

\b
EXAMPLE
  mechdiff analyze refusal --base zoo/base --post zoo/post \\
    --harmful data/instructions_harmful.csv \\
    --harmless data/instructions_harmless.csv --out results
"""


def read_phrases(values: List[str]) -> list[str]:
    """``--phrases`` values: each is one phrase, or ``@FILE`` for a file with one phrase per line."""
    out: list[str] = []
    for v in values:
        if v.startswith("@"):
            path = Path(v[1:])
            if not path.is_file():
                raise ValueError(f"--phrases {v}: no such file {path}")
            out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        elif v.strip():
            out.append(v)
    if not out:
        raise ValueError("--phrases: no phrase given")
    return out


def register(analyze_app: typer.Typer) -> None:
    """Add the ``refusal`` command to the ``analyze`` sub-app."""

    @analyze_app.command("refusal", help=HELP, no_args_is_help=True)
    def refusal(
        base: str = typer.Option(..., "--base", "-b", help="Base model: local directory or hub id."),
        post: List[str] = typer.Option(..., "--post", "-p", help="Post-trained model(s); repeat for several."),
        harmful: Path = typer.Option(..., "--harmful", help="Harmful instructions: CSV/JSON/JSONL (instruction or goal column, optional split)."),
        harmless: Path = typer.Option(..., "--harmless", help="Harmless instructions, same format."),
        out_dir: Path = typer.Option(..., "--out", "-o", help="Results directory (OUT/refusal/ is written)."),
        store: Optional[str] = typer.Option(None, "--store", help="Activation store root (local path or fsspec URL) (default OUT/store.zarr)."),
        max_new_tokens: int = typer.Option(24, "--max-new-tokens", help="Length of each greedy completion."),
        phrases: Optional[List[str]] = typer.Option(
            None, "--phrases",
            help="Refusal phrase (repeat), or @FILE with one per line; replaces the default list "
                 "(the zoo's phrases plus 'I cannot', 'I'm sorry', 'As an AI', ...).",
        ),
        n_val: int = typer.Option(32, "--n-val", help="Validation prompts per class for choosing the direction."),
        n_eval: int = typer.Option(64, "--n-eval", help="Test prompts per class for the refusal scores."),
        skip_last: float = typer.Option(0.2, "--skip-last", help="Fraction of last layers never chosen."),
        site: str = typer.Option("resid_post", "--site", help="resid_post or resid_pre: where directions are read and added."),
        base_template: Optional[str] = typer.Option(None, "--base-template", help="Base template with {text} (default 'User: {text}\\nAssistant:')."),
        post_template: Optional[str] = typer.Option(None, "--post-template", help="Post template: chat or a string with {text} (default chat)."),
        name: str = typer.Option("group", "--name", help="Model group name (names the store groups)."),
        generator: str = typer.Option("hf", "--generator", help="hf (transformers generate) or vllm (GPU only)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Prompts per forward / generate batch."),
        text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding the instruction, if not a usual name."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
        model_dtype: str = typer.Option("float32", "--model-dtype", help="float32, bfloat16 or float16."),
        store_dtype: str = typer.Option("float16", "--store-dtype", help="Stored activations: float16 or float32."),
        seed: int = typer.Option(0, "--seed", help="Seed for drawing missing splits."),
        addition_scope: str = typer.Option("prompt", "--addition-scope", help="Where addition acts: prompt (the prompt's positions) or all (every position, generated tokens too; needed for vllm)."),
        addition_coef: Optional[List[float]] = typer.Option(None, "--addition-coef", help="Addition coefficient to try on validation (repeat; default 1 1.5 2 3)."),
        rerank: int = typer.Option(4, "--rerank", help="Best candidates by the logit score re-scored by validation completions (0: logit score only, coefficient 1)."),
        match: str = typer.Option("substring", "--match", help="How a completion counts as a refusal: substring (a phrase anywhere) or prefix (the reply starts with one)."),
        addition_unit: bool = typer.Option(False, "--addition-unit", help="Add the unit direction times the coefficient (the paper) instead of the difference of means."),
        kl_max: Optional[float] = typer.Option(None, "--kl-max", help="Drop candidates whose ablation moves harmless next-token distributions by KL above this (Arditi et al.: 0.1)."),
        select_all: bool = typer.Option(False, "--select-all", help="Search and steer a direction also in models that do not refuse (their verdict stays inconclusive)."),
        n_bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the intervals."),
    ) -> None:
        from rich.console import Console
        from rich.table import Table

        from mechdiff.analyses.common import ModelGroup
        from mechdiff.analyses.refusal import run_refusal

        out = Console()
        try:
            check_output_dir(out_dir)
            group = ModelGroup(name, base, tuple(post))
            templates = {}
            if base_template:
                templates[group.labels[0]] = base_template
            if post_template:
                templates.update({l: post_template for l in group.labels[1:]})
            ph = read_phrases(phrases) if phrases else None
            for p in (harmful, harmless):
                if not p.is_file():
                    raise ValueError(f"{p}: no such file")
            res = run_refusal(
                group, harmful, harmless, out_dir, store=store, site=site, templates=templates or None,
                phrases=ph, max_new_tokens=max_new_tokens, n_val=n_val, n_eval=n_eval, skip_last=skip_last,
                generator=generator, batch_size=batch_size, text_column=text_column, store_dtype=store_dtype,
                model_dtype=model_dtype, device=device, seed=seed, addition_scope=addition_scope,
                addition_coefs=tuple(addition_coef) if addition_coef else (1.0, 1.5, 2.0, 3.0), rerank=rerank,
                match=match, addition_unit=addition_unit, kl_max=kl_max, select_all=select_all,
                n_bootstrap=n_bootstrap, progress=True,
            )
        except (*EXPECTED, RuntimeError) as e:
            fail(e)
        s = res.summary
        t = Table(title="chosen refusal direction", title_justify="left")
        for c in ("model", "refuses (harmful - harmless)", "layer", "position", "norm", "coef", "val logit score"):
            t.add_column(c)
        for m, c in s["chosen"].items():
            r = s["refuses"][m]
            t.add_row(m, f"{r['value']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]", str(c["layer"]), str(c["position"]),
                      f"{c['norm']:.3g}", f"{c['coef']:g}",
                      f"{c['score']:.2f}" if c["selected"] else "not searched (does not refuse)")
        out.print(t)
        for pair, cs in s["comparisons"].items():
            t = Table(title=f"refusal directions {pair}: cosine vs controls", title_justify="left")
            for c in ("comparison", "cosine [95% CI]", "null (95%)", "split-half ceiling", "reading"):
                t.add_column(c)
            for k, c in cs.items():
                t.add_row(k, f"{c['cosine']:+.2f} [{c['interval'][0]:+.2f}, {c['interval'][1]:+.2f}]",
                          f"{c['null_upper']:+.2f}", f"{c['ceiling']:+.2f}", c["status"])
            out.print(t)
        for pair, c in s["cosine"].items():
            by_layer = " ".join("nan" if v is None or v != v else f"{v:+.2f}" for v in c["at_chosen_positions_by_layer"])
            out.print(f"cosine {pair}: chosen {c['chosen']:+.3f}; by layer (chosen positions): {by_layer}")
        t = Table(title="refusal score (%): harmful with direction ablated / harmless with direction added",
                  title_justify="left")
        for c in ("model", "direction", "harmful", "harmless"):
            t.add_column(c)
        for m, r in s["refusal_scores"].items():
            t.add_row(m, "none", f"{100 * r['baseline']['harmful']:.0f}", f"{100 * r['baseline']['harmless']:.0f}")
            for src in r["ablation"]:
                kind = "own" if src == m else "transferred"
                t.add_row(m, f"{src} ({kind})", f"{100 * r['ablation'][src]:.0f}", f"{100 * r['addition'][src]:.0f}")
        out.print(t)
        for f in res.findings:
            out.print(f"{f.finding} [{f.pair}]: {f.verdict} ({f.reason}; {f.detail})")
        out.print(f"results: {Path(out_dir) / 'refusal'}")
