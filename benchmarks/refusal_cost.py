"""The refusal study's cost, before and after: whole-process wall time of `mechdiff analyze refusal` with fixed
flags, for two code trees, run alternating, with where the time goes and whether the results are the same.

    python benchmarks/refusal_cost.py [--runs 2] [--cases pair,smollm2] [--src DIR] [--base DIR]

Cases (each run is `python -m mechdiff.cli analyze refusal ...` in its own process):

pair     the embedded pair with the command's defaults: 420 harmful and 420 harmless instructions,
         --n-val 32 --n-eval 64 --max-new-tokens 24
smollm2  SmolLM2-135M-Instruct (the GGUF of the real-model tests, .cache/models/ or $MECHDIFF_SMOLLM2_GGUF) as
         base and post, the first 20 rows of tests/data/refusal_harmful.csv and refusal_harmless.csv,
         --n-val 4 --n-eval 8 --max-new-tokens 24 (skipped without the GGUF or the gguf package)

Trees: ``--src DIR`` is measured (default: this checkout), ``--base DIR`` is the reference (default: HEAD's
code, made with ``git archive HEAD mechdiff | tar -x -C /tmp/refusal_base`` when missing); each goes first on
PYTHONPATH of its runs. Runs alternate base, src, base, src, ...; the ratio is of the medians. Each run goes
through this file's ``--child`` wrapper, which times the study's phases (exclusive wall time of the functions
below, where the tree has them) and writes them next to the results:

  model loading       engine.models.load_model
  extraction          engine.extract.extract
  candidate search    refusal.select_direction outside the parts below (the logit scores of every candidate)
  KL filter           refusal.ablation_kl (reached only with --kl-max)
  selection gens      refusal._rerank (validation completions of the re-ranked candidates)
  steered test gens   refusal.intervention_scores
  unsteered test gens generation called outside the phases above (each model's plain test completions)
  controls            refusal.template_comparisons and refusal_controls.rate_difference (bootstraps, nulls)
  figures             refusal._figures and refusal._pca_figure
  other               the rest: imports, the CLI, directions, saving

The results are compared between the trees: each model's chosen direction and selection scores, the refusal
scores and every test completion in summary.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
PHASES = ("model loading", "extraction", "candidate search", "KL filter", "selection gens", "steered test gens",
          "unsteered test gens", "controls", "figures", "other")


# -- the child: the CLI with phase timers --------------------------------------------------------------------


def child(out_json: str, argv: list[str]) -> None:
    t0 = time.perf_counter()
    import importlib

    spent = dict.fromkeys(PHASES, 0.0)
    stack: list[list] = []  # [phase, start, time spent in phases inside it]

    def timed(fn, phase: str, top_only: bool = False):
        def wrapper(*a, **k):
            if top_only and stack:  # generation inside another phase belongs to that phase
                return fn(*a, **k)
            stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                ph, start, inner = stack.pop()
                took = time.perf_counter() - start
                spent[ph] += took - inner
                if stack:
                    stack[-1][2] += took

        return wrapper

    def patch(module: str, name: str, phase: str, owner: str | None = None, top_only: bool = False) -> None:
        mod = importlib.import_module(module)
        obj = getattr(mod, owner) if owner else mod
        if hasattr(obj, name):
            setattr(obj, name, timed(getattr(obj, name), phase, top_only))

    patch("mechdiff.engine.models", "load_model", "model loading")
    patch("mechdiff.engine.extract", "extract", "extraction")
    patch("mechdiff.analyses.refusal", "select_direction", "candidate search")
    patch("mechdiff.analyses.refusal", "ablation_kl", "KL filter")
    patch("mechdiff.analyses.refusal", "_rerank", "selection gens")
    patch("mechdiff.analyses.refusal", "intervention_scores", "steered test gens")
    patch("mechdiff.analyses.refusal", "template_comparisons", "controls")
    patch("mechdiff.analyses.refusal", "rate_difference", "controls")
    patch("mechdiff.analyses.refusal", "_figures", "figures")
    patch("mechdiff.analyses.refusal", "_pca_figure", "figures")
    for name in ("generate", "generate_many"):
        patch("mechdiff.engine.generate", name, "unsteered test gens", owner="HFGenerator", top_only=True)
    from mechdiff.cli import main

    sys.argv = ["mechdiff", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    total = time.perf_counter() - t0
    spent["other"] = total - sum(v for k, v in spent.items() if k != "other")
    Path(out_json).write_text(json.dumps({"total": total, "phases": spent}))


# -- the parent ----------------------------------------------------------------------------------------------


def smollm2_path() -> Path | None:
    p = Path(os.environ.get("MECHDIFF_SMOLLM2_GGUF", REPO / ".cache" / "models" / SMOLLM2)).expanduser()
    return p if p.is_file() and importlib.util.find_spec("gguf") is not None else None


def cases(work: Path) -> dict[str, list[str]]:
    """Case name -> the CLI arguments (without --out)."""
    from mechdiff.zoo.paths import zoo_path

    out = {}
    d = zoo_path("data")
    out["pair"] = ["analyze", "refusal", "--base", str(zoo_path("base")), "--post", str(zoo_path("post")),
                   "--harmful", str(d / "instructions_harmful.csv"), "--harmless", str(d / "instructions_harmless.csv")]
    gguf = smollm2_path()
    if gguf is not None:
        files = []
        for kind in ("harmful", "harmless"):
            rows = (REPO / "tests" / "data" / f"refusal_{kind}.csv").read_text().splitlines()
            f = work / f"smollm2_{kind}.csv"
            f.write_text("\n".join(rows[:21]) + "\n")  # the header and the first 20 instructions
            files.append(str(f))
        out["smollm2"] = ["analyze", "refusal", "--base", str(gguf), "--post", str(gguf), "--harmful", files[0],
                          "--harmless", files[1], "--n-val", "4", "--n-eval", "8", "--max-new-tokens", "24"]
    return out


def run(tree: str, args: list[str], out: Path, cwd: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    timing = out.with_suffix(".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(timing), "--", *args, "--out", str(out)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-3000:]}")
    res = json.loads(timing.read_text())
    res["wall"] = wall
    res["summary"] = json.loads((out / "refusal" / "summary.json").read_text())["summary"]
    return res


def same_results(a: dict, b: dict) -> list[str]:
    """What differs between two summaries: the chosen directions and their scores, the refusal scores, the test
    completions."""
    diff = []
    for key in ("chosen", "refusal_scores", "completions", "refuses"):
        if a.get(key) != b.get(key):
            diff.append(key)
    return diff


def make_base(path: Path) -> None:
    if (path / "mechdiff").is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "mechdiff"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True)


def _spread(v: list[float]) -> str:
    return f"{statistics.median(v):.1f} s [{min(v):.1f}-{max(v):.1f}]"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per tree and case, alternating")
    ap.add_argument("--cases", default="pair,smollm2", help="comma-separated: pair, smollm2")
    ap.add_argument("--src", default=str(REPO), help="the code tree measured (default: this checkout)")
    ap.add_argument("--base", default="/tmp/refusal_base", help="the reference tree (default: HEAD's code)")
    args = ap.parse_args()
    base = Path(args.base)
    if args.base == "/tmp/refusal_base":
        make_base(base)
    trees = {"base": str(base), "src": str(Path(args.src).resolve())}
    work = Path(tempfile.mkdtemp(prefix="refusal_cost_"))
    try:
        all_cases = cases(work)
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        for name in wanted:
            if name not in all_cases:
                print(f"{name}: skipped ({'no SmolLM2 GGUF or gguf package' if name == 'smollm2' else 'unknown case'})")
                continue
            print(f"== {name}: python -m mechdiff.cli {' '.join(all_cases[name])} --out OUT", flush=True)
            got: dict[str, list[dict]] = {t: [] for t in trees}
            for r in range(args.runs):
                for t, tree in trees.items():
                    out = work / f"{name}_{t}_{r}"
                    res = run(tree, all_cases[name], out, work)
                    got[t].append(res)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"   run {r + 1} {t:4s}: {res['wall']:.1f} s", flush=True)
            walls = {t: [x["wall"] for x in v] for t, v in got.items()}
            for t in trees:
                print(f"   {t:4s} ({trees[t]}): {_spread(walls[t])}")
            ratio = statistics.median(walls["base"]) / statistics.median(walls["src"])
            print(f"   base / src (wall, medians): {ratio:.2f}x faster")
            fastest = {t: min(v, key=lambda x: x["wall"]) for t, v in got.items()}
            print("   where the time goes (the fastest run of each, seconds):")
            print(f"   {'phase':22s}" + "".join(f"{t:>10s}" for t in trees))
            for ph in PHASES:
                print(f"   {ph:22s}" + "".join(f"{fastest[t]['phases'][ph]:10.1f}" for t in trees))
            print(f"   {'total (in process)':22s}" + "".join(f"{fastest[t]['total']:10.1f}" for t in trees))
            diff = sorted({d for x in got["src"] for y in got["base"] for d in same_results(x["summary"], y["summary"])})
            print("   results: " + ("the same in every run (chosen directions, selection and refusal scores, "
                                    "completions)" if not diff else f"DIFFER in {', '.join(diff)}"), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
