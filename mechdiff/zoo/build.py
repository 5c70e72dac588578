"""Build the embedded pair from a seed: world -> datasets -> tokenizer -> base -> post -> manifest."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mechdiff.errors import MechdiffError
from mechdiff.zoo.corpus import BASE_PHASES, LABEL_WEIGHT, POST_PHASES, SUPPORTED_FRACTION, corpus, corpus_texts
from mechdiff.zoo.datasets import make_datasets, write_datasets
from mechdiff.zoo.tokenizer import build_tokenizer
from mechdiff.zoo.train import ModelSpec, StageSpec, cpu_has_fast_bf16, new_model, train
from mechdiff.zoo.world import make_world

MODEL = ModelSpec()
BASE = StageSpec(steps=3000, lr=2.5e-3, warmup_frac=0.03)
POST = StageSpec(steps=240, lr=5e-4, warmup_frac=0.1)
SAVE_DTYPE = torch.float16  # halves the shipped size; the models are trained and run in fp32
N_THREADS = 2
SEED = 1  # the shipped pair's


class BuildTargetError(MechdiffError, OSError):
    """The build's output directory is not a new or empty directory; nothing is overwritten."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save(model: torch.nn.Module, tok, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    half = copy.deepcopy(model).to(SAVE_DTYPE)
    half.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # The weights are stored in fp16 but the model is meant to run in fp32 (it was trained so,
    # and fp16 matmuls on CPU are slow): dtype="auto" loaders should pick fp32.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _tail_mean(xs: list[float], n: int = 20) -> float:
    tail = xs[-n:]
    return float(sum(tail) / max(1, len(tail)))


def build_pair(
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int = SEED,
    progress: bool = True,
    evaluate: bool = True,
) -> Path:
    """Reproduce the shipped pair into ``out_dir`` (``base/``, ``post/``, ``data/``, ``manifest.json``).

    ``steps`` overrides the base model's step budget (the post stage gets the same fraction of
    it as in the default recipe); ``None`` means the shipped recipe. ``evaluate`` measures the
    behaviour figures on held-out data and records them in the manifest. Deterministic given
    ``seed`` (on the same torch build and thread count).

    ``out_dir`` must not exist or be empty (:class:`BuildTargetError` otherwise, before any work). The
    pair is built in a temporary directory beside it and renamed into place at the end, so an interrupted
    build leaves no half-written ``out_dir``."""
    out = Path(out_dir)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the pair's
    try:
        _build_into(tmp, steps=steps, seed=seed, progress=progress, evaluate=evaluate)
    except BaseException:  # an error or Ctrl-C: no half-built pair left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        check_target(out)  # something may have been written there during the build
    except BuildTargetError as e:
        raise BuildTargetError(f"{e}; the built pair is kept in {tmp}") from None
    if out.exists():
        out.rmdir()  # empty, checked just above (Windows cannot rename onto a directory)
    os.replace(tmp, out)
    return out


def check_target(out: Path) -> None:
    """Refuse an output that would lose or mix files: anything but a missing or empty directory."""
    if out.exists() and not out.is_dir():
        raise BuildTargetError(f"zoo build: --out {out} exists and is not a directory; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise BuildTargetError(
            f"zoo build: --out {out} is not empty; give a new or empty directory (nothing there is overwritten)"
        )


def _build_into(out: Path, *, steps: int | None, seed: int, progress: bool, evaluate: bool) -> None:
    """The build itself, into the existing, empty directory ``out``."""
    t0 = time.time()
    bf16 = cpu_has_fast_bf16()
    base_spec = StageSpec(**{**BASE.asdict(), "bf16": bf16})
    post_spec = StageSpec(**{**POST.asdict(), "bf16": bf16})
    if steps is not None:
        base_spec = StageSpec(**{**base_spec.asdict(), "steps": max(1, steps)})
        post_spec = StageSpec(**{**post_spec.asdict(), "steps": max(1, round(steps * POST.steps / BASE.steps))})

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(N_THREADS)
    columns = (TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, transient=False) if progress else None
    try:
        with bar if bar is not None else nullcontext():
            def task(desc: str, total: int):
                return bar.add_task(desc, total=total, info="") if bar is not None else None

            def advance(tid, n: int = 1, info: str = "") -> None:
                if bar is not None:
                    bar.update(tid, advance=n, info=info)

            t_data = task("world + data", 3)
            world = make_world(seed)
            ds = make_datasets(world)
            advance(t_data)
            data_files = write_datasets(ds, out / "data")
            advance(t_data)
            tok = build_tokenizer(ds.all_texts() + corpus_texts(world, ds))
            advance(t_data, info=f"vocab {len(tok)}")

            losses: dict[str, list[float]] = {}
            models = {}
            for stage, spec, s_seed in (("base", base_spec, seed), ("post", post_spec, seed + 1)):
                tid = task(f"{stage} model", spec.steps)
                data = corpus(world, ds, tok, stage=stage, n_windows=spec.steps * spec.batch,
                              seq_len=spec.seq_len, seed=s_seed)
                model = new_model(MODEL, tok, seed) if stage == "base" else copy.deepcopy(models["base"])

                def on_step(step: int, loss: float, tid=tid) -> None:
                    advance(tid, info=f"loss {loss:.3f}")

                t_stage = time.time()
                losses[stage] = train(model, data, spec, seed=s_seed, on_step=on_step)
                models[stage] = model
                _save(model, tok, out / stage)
                if bar is not None:
                    bar.console.log(f"{stage}: {spec.steps} steps in {time.time() - t_stage:.0f}s, "
                                    f"final loss {_tail_mean(losses[stage]):.3f}")

            metrics: dict[str, dict[str, float]] = {}
            if evaluate:
                from mechdiff.zoo.evaluate import behaviour

                tid = task("evaluate", 2)
                for stage, template in (("base", "base"), ("post", "chat")):
                    # Measure what ships: the fp16-rounded weights, run in fp32.
                    shipped = copy.deepcopy(models[stage]).to(SAVE_DTYPE).float().eval()
                    metrics[stage] = {k: round(v, 4) for k, v in behaviour(shipped, tok, ds, template).items()}
                    advance(tid)
                    if bar is not None:
                        m = metrics[stage]
                        bar.console.log(f"{stage}: truth {m['truth_true']:.2f}/{m['truth_false']:.2f}, facts {m['facts']:.2f}, "
                                        f"refusal {m['refusal_harmful']:.2f}/{m['refusal_harmless']:.2f}")
    finally:
        torch.set_num_threads(prev_threads)

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "name": "mechdiff zoo pair",
        "seed": seed,
        "build_seconds": round(time.time() - t0, 1),
        "files": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
        "model": {**MODEL.__dict__, "vocab_size": len(tok), "architecture": "LlamaForCausalLM",
                  "saved_dtype": str(SAVE_DTYPE).removeprefix("torch."),
                  "n_params": sum(p.numel() for p in models["base"].parameters())},
        "training": {
            "base": {**base_spec.asdict(), "phases": BASE_PHASES, "seed": seed},
            "post": {**post_spec.asdict(), "phases": POST_PHASES, "seed": seed + 1, "init": "base"},
            "label_weight": LABEL_WEIGHT, "supported_fraction": SUPPORTED_FRACTION,
            "threads": N_THREADS,
        },
        "final_loss": {k: round(_tail_mean(v), 4) for k, v in losses.items()},
        "metrics": metrics,
        "datasets": {p.name: _rows(p) for p in data_files if p.suffix == ".csv"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _rows(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f) - 1
