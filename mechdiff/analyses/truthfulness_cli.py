"""``mechdiff analyze truthfulness``: mounted on the ``analyze`` sub-app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mechdiff.cli_common import EXPECTED, check_output_dir, fail

__all__ = ["register", "truthfulness_cmd"]


def truthfulness_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for results: OUT/truthfulness/{results.zarr, summary.json, *.png}."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: local directory or hub id \\[default: the embedded zoo base model]."),
    post: Optional[List[str]] = typer.Option(None, "--post", help="Post-trained model(s), repeatable \\[default: the embedded zoo post model]."),
    data: Optional[List[Path]] = typer.Option(None, "--data", "-d", help="Statement CSVs (statement,label,topic[,split]) or a directory of truth_*.csv, repeatable \\[default: the zoo's datasets]."),
    store: Optional[str] = typer.Option(None, "--store", help="Activation store root (local path or fsspec URL) \\[default: OUT/store.zarr]. Existing groups are resumed, not recomputed."),
    shots: Optional[Path] = typer.Option(None, "--shots", help="JSON {topic: \\[\\[statement, label], ...]} of few-shot examples \\[default: DATA/shots.json if present, else drawn from the train split]."),
    heldout_topic: Optional[List[str]] = typer.Option(None, "--heldout-topic", help="Topic to test probes on (repeatable) \\[default: every topic in turn]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Intervention layers: a list 3,4,5 or a range 3:6 (end exclusive) \\[default: a window of a quarter of the layers ending at each model's best layer]."),
    coef: float = typer.Option(1.0, "--coef", help="Intervention strength in units of the mean difference between true and false statements."),
    direction_layer: str = typer.Option("each", "--direction-layer", help="each: every intervened layer gets its own layer's direction; best: the direction at the model's best layer everywhere."),
    transfer_scale: str = typer.Option("target", "--transfer-scale", help="Scale of a transferred direction: target (the intervened model's mean difference) or source (the other model's)."),
    center_by_topic: bool = typer.Option(False, "--center-by-topic", help="The paper's centring: subtract each topic's (dataset's) mean activation over all its statements, per model, before directions, probes, probe transfer, cosines and the PCA figure \\[default: off: a held-out topic's own mean is not known for a single new statement, so uncentred held-out accuracy is the stricter test]."),
    probe_position: Optional[int] = typer.Option(None, "--probe-position", help="-1: the period; -2: the token before it (default: the one with the better validation accuracy)."),
    probe_layer: Optional[int] = typer.Option(None, "--probe-layer", help="The paper's protocol: one layer for every model and topic (probes, cosine, intervention window) \\[default: each model's best layer on validation rows]."),
    n_intervene: int = typer.Option(100, "--n-intervene", help="Held-out statements intervened on per topic (balanced true/false)."),
    n_shots: int = typer.Option(4, "--n-shots", help="Few-shot examples in each intervention prompt."),
    suffix: str = typer.Option(" This statement is:", "--suffix", help="Text after the statement in the few-shot prompt."),
    label_words: str = typer.Option("FALSE,TRUE", "--label-words", help="The false and true answer words, comma-separated."),
    intervene: bool = typer.Option(True, "--intervene/--no-intervene", help="Run the intervention (needs the models) or only the store analyses."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Short model names, comma-separated, base first \\[default: base,post or base,post0,post1,...]."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    model_dtype: str = typer.Option("float32", "--model-dtype", help="Dtype the models run in."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="Stored activation dtype: float32 or float16."),
    shard_size: int = typer.Option(256, "--shard-size", help="Examples per store shard (the unit of resumption)."),
    token_budget: int = typer.Option(16384, "--token-budget", help="Padded tokens per batch."),
    seed: int = typer.Option(0, "--seed", help="Seed for statement sampling (and validation rows when the data has no split column)."),
) -> None:
    """Is there a linear truth direction, and do base and post-trained models share it?

    [bold]DESCRIPTION[/]

    Extracts resid_post at the statement's last two tokens (the token before the period and the period;
    positions last:2) for every model into the store, resuming finished shards. Then, per model and layer:
    the difference-of-means direction (true minus false) fitted on the train split of all topics but a
    held-out one, and a 1-D probe's accuracy on the held-out topic; the best layer is the one with the best
    validation accuracy (held-out subjects of the training topics), or the layer --probe-layer gives, for
    every model (the paper's protocol). --center-by-topic subtracts each topic's mean activation first (the
    paper's centring). Across models: cosine of the directions per layer and probe transfer (model A's direction on model B's activations, threshold as it was and
    refitted on B). Finally the intervention: on few-shot prompts ending in SUFFIX, the direction, scaled by
    the mean difference times COEF, is added at the statement's last two tokens of false statements and
    subtracted from true ones; the normalised intervention effect NIE on P(TRUE) - P(FALSE) is 1 when
    statements move all the way to the other label's mean, 0 when nothing changes. Own vs transferred
    direction, base -> post and post -> base.

    [bold]OUTPUT[/]

    OUT/truthfulness/results.zarr (xarray), summary.json (every number and the findings),
    cosine_by_layer.png, probe_accuracy_by_layer.png, transfer_table.png, nie_table.png, pca.png (each model's
    statements at the probe layer on its first two principal components, with its truth direction).
    The verdict (agrees / disagrees / inconclusive) is decided against controls from the same run: a
    shuffled-label null of the cross-model cosine (20 seeded shuffles, 95th percentile), a split-half
    reliability ceiling, and bootstrap 95% intervals. No truth direction in a model (own held-out probe
    < 0.6, or its interval not above 0.55): inconclusive. Cosine interval above the null and cosine within
    0.1 of the ceiling: agrees (then the transferred probe must be within 0.05 of the target's own and the
    transferred NIE >= 0.75 of own, else disagrees; a prompt gap < 0.05 leaves NIE no scale: inconclusive).
    Cosine interval below the null: disagrees. Otherwise inconclusive.

    [bold]EXAMPLES[/]

    mechdiff analyze truthfulness --out results/          (the embedded pair and its statements)

    mechdiff analyze truthfulness --base meta-llama/Llama-3.1-8B --post meta-llama/Llama-3.1-8B-Instruct
    --data geometry_of_truth/ --heldout-topic cities --layers 8:13 --coef 2 --out results/ --device cuda
    """
    from rich.console import Console
    from rich.table import Table

    from mechdiff.analyses.common import ModelGroup, StoreRequirementError
    from mechdiff.analyses.truthfulness import TruthSettings, load_statements, run_truthfulness
    from mechdiff.engine.data import DataError

    try:
        check_output_dir(out)
        if base is None or not post:
            from mechdiff.zoo.paths import zoo_path

            base = base or str(zoo_path("base"))
            post = post or [str(zoo_path("post"))]
        if not data:
            from mechdiff.zoo.paths import zoo_path

            data = [zoo_path("data")]
        words = tuple(w.strip() for w in label_words.split(","))
        if len(words) != 2 or not all(words):
            raise ValueError(f"--label-words {label_words!r}: give two words, false first, e.g. FALSE,TRUE")
        names = tuple(x.strip() for x in labels.split(",")) if labels else ()
        group = ModelGroup("truthfulness", str(base), tuple(post), names)
        iv_layers = _parse_layers(layers, str(base)) if layers else None
        if probe_layer is not None:
            n_layers = _n_layers(str(base))
            if not 0 <= probe_layer < n_layers:
                raise ValueError(f"--probe-layer {probe_layer}: the model has layers 0..{n_layers - 1}")
        settings = TruthSettings(
            probe_position=probe_position, probe_layer=probe_layer, heldout_topics=tuple(heldout_topic) if heldout_topic else None,
            center_by_topic=center_by_topic, seed=seed, intervene=intervene, iv_layers=iv_layers, coef=coef,
            direction_layer=direction_layer, transfer_scale=transfer_scale, n_intervene=n_intervene,
            n_shots=n_shots, suffix=suffix, label_words=words,  # type: ignore[arg-type]
        )
        statements, shot_map = load_statements(list(data), shots=shots)  # checks the files before any model loads
        if heldout_topic:
            have = set(str(t) for t in statements.columns["topic"])
            miss = [t for t in heldout_topic if t not in have]
            if miss:
                raise ValueError(f"--heldout-topic {miss} not among the statements' topics {sorted(have)}")
    except (DataError, *EXPECTED) as e:
        fail(e)
    try:
        res = run_truthfulness(
            group, statements, out, store=store, shots=shot_map, settings=settings, device=device,
            model_dtype=model_dtype, store_dtype=store_dtype, shard_size=shard_size, token_budget=token_budget,
            progress=True,
        )
    except (StoreRequirementError, DataError, *EXPECTED) as e:
        fail(e)

    s = res.summary
    t = Table(title="truth direction: base vs post-trained")
    for col in ("pair", "cosine@best", "probe own (A / B)", "A->B / B->A (refit)", "NIE B own / A's", "NIE A own / B's", "cosine CI", "null upper / ceiling", "verdict"):
        t.add_column(col)
    for f in res.findings:
        a, b = f.pair.split(" vs ")
        fg = f.figures
        def nie(tgt: str, src: str) -> str:
            if f"nie_{tgt}_own" not in fg:
                return "-"  # --no-intervene
            return f"{fg[f'nie_{tgt}_own']:.2f} / {fg[f'nie_{tgt}_with_{src}_dir']:.2f}"

        nie_b, nie_a = nie(b, a), nie(a, b)
        t.add_row(
            f.pair, f"{fg['cosine_at_best_layer']:.2f}", f"{fg[f'acc_{a}_own']:.2f} / {fg[f'acc_{b}_own']:.2f}",
            f"{fg[f'acc_{a}_dir_on_{b}_refit']:.2f} / {fg[f'acc_{b}_dir_on_{a}_refit']:.2f}", nie_b, nie_a,
            f"[{f.interval[0]:.2f}, {f.interval[1]:.2f}]" if f.interval else "-",
            f"{f.controls.get('cosine_null_upper', float('nan')):.2f} / {f.controls.get('cosine_ceiling', float('nan')):.2f}",
            f.verdict,
        )
    Console().print(t)
    for f in res.findings:
        Console().print(f"{f.pair}: {f.verdict} ({f.reason})", highlight=False)
        Console().print(f"  {f.detail}", highlight=False)
    Console().print(f"best layers {s['best_layer']}; results in {Path(out) / 'truthfulness'}")


def _parse_layers(spec: str, model: str) -> tuple[int, ...]:
    """Layer spec checked against the model's config (no weights loaded)."""
    from mechdiff.engine.sites import parse_layers

    n = _n_layers(model)
    return tuple(parse_layers(spec, n))


def _n_layers(model: str) -> int:
    from mechdiff.engine.precheck import config_n_layers, read_config

    return config_n_layers(read_config(model), model)


def register(analyze_app: typer.Typer) -> None:
    """Add ``truthfulness`` to the ``analyze`` command group."""
    analyze_app.command("truthfulness", no_args_is_help=False)(truthfulness_cmd)
