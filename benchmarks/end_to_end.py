"""End to end, whole process: `mechdiff extract` against the script a researcher writes with each tool.

The random Llama of `extract_overhead.py` (8 layers, d_model 512), 512 prompts of 16-128 tokens (fixed seed)
in a CSV, last-token resid_post at every layer, written to disk as float16. Every method is its own process,
timed from start to exit (imports, loading, tokenizing, the forward passes, writing), with its peak RSS
(``wait4``'s ru_maxrss of that child alone). Methods run alternating (A B C A B C ...): a warm-up round whose
output is checked against an unpadded HF reference before anything is timed, then ``--runs`` timed rounds.

    python benchmarks/end_to_end.py [--runs 3] [--prompts 512] [--quick] [--src LABEL=DIR ...]

mechdiff        `python -m mechdiff.cli extract --model M --data D --out S` with its defaults
hf-order        HF forward hooks on every decoder layer, batches of 32 in dataset order, np.save
hf-sorted       the same with the prompts sorted by length first
hf-sorted-stack the same, calling the decoder stack alone (no unembedding): the strictest hand loop
nnsight         `LanguageModel.trace` + `.save()`, batches of 32 (when nnsight is importable)
tlens           TransformerLens `TransformerBridge.run_with_cache`, batches of 32 (when importable)
mechdiff@LABEL  with --src LABEL=DIR: the same command with DIR first on PYTHONPATH (e.g. a previous
                commit's `git archive HEAD~1 mechdiff | tar -x -C DIR`), for a paired before/after

The hand loops are the ~40 lines a user writes: load, tokenize each batch with the tokenizer's padding,
hook, stack, cast, save. Run-to-run noise on a shared machine is large; only ratios within one run count.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout whose mechdiff is measured, installed or not
BATCH = 32  # the hand loops' batch size
N_LAYERS = 8
D_MODEL = 512
VOCAB = 8192


# -- the hand-written scripts (each runs in its own process: only what a user would import) ---------------


def _read_texts(data: str) -> list[str]:
    with open(data, newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def hf_loop(model_dir: str, data: str, out: str, *, sort: bool, stack_only: bool = False) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = _read_texts(data)
    tok = AutoTokenizer.from_pretrained(model_dir)  # pads on the left: the last token is at -1
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = model.model.layers
    order = list(range(len(texts)))
    if sort:
        lengths = [len(x) for x in tok(texts)["input_ids"]]
        order.sort(key=lengths.__getitem__)
    grabbed: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # a tensor in transformers 5
            grabbed[i] = h[:, -1]
        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(grab(i))
    result = np.empty((len(texts), len(layers), model.config.hidden_size), np.float16)
    run = model.model if stack_only else model
    with torch.inference_mode():
        for s in range(0, len(order), BATCH):
            rows = order[s : s + BATCH]
            enc = tok([texts[r] for r in rows], padding=True, return_tensors="pt")
            run(**enc)
            result[rows] = torch.stack([grabbed[i] for i in range(len(layers))], 1).half().numpy()
    np.save(out, result)


def nnsight_loop(model_dir: str, data: str, out: str) -> None:
    import numpy as np
    import torch
    import transformers
    from nnsight import LanguageModel

    texts = _read_texts(data)
    model = LanguageModel(model_dir, device_map="cpu", dispatch=True)
    layers = model.model.layers
    tuple_out = int(transformers.__version__.split(".")[0]) < 5  # a decoder layer returns a tensor from 5.x on
    result = np.empty((len(texts), len(layers), model.config.hidden_size), np.float16)
    # Strings in: nnsight tokenizes and pads them itself (pre-tokenized batches get re-padded; see DESIGN.md).
    with torch.no_grad():  # trace records gradients otherwise
        for s in range(0, len(texts), BATCH):
            # A list made outside the block and filled inside: nnsight runs the block's code apart from this
            # function's frame, so names first bound inside it are not bound here afterwards.
            saved = []
            with model.trace(texts[s : s + BATCH]):
                for layer in layers:
                    saved.append((layer.output[0] if tuple_out else layer.output)[:, -1].save())
            acts = torch.stack([getattr(x, "value", x) for x in saved], 1)
            result[s : s + BATCH] = acts.detach().half().numpy()
    np.save(out, result)


def tlens_loop(model_dir: str, data: str, out: str) -> None:
    import numpy as np
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    texts = _read_texts(data)
    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu")
    names = [f"blocks.{i}.hook_out" for i in range(N_LAYERS)]
    result = np.empty((len(texts), N_LAYERS, D_MODEL), np.float16)
    with torch.inference_mode():
        for s in range(0, len(texts), BATCH):
            enc = bridge.tokenizer(texts[s : s + BATCH], padding=True, return_tensors="pt")
            _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                             names_filter=lambda n: n in names)
            last = enc["attention_mask"].shape[1] - 1 if bridge.tokenizer.padding_side == "left" else None
            idx = enc["attention_mask"].sum(1) - 1 if last is None else torch.full((len(enc["input_ids"]),), last)
            rows = torch.arange(len(idx))
            result[s : s + BATCH] = torch.stack([cache[n][rows, idx] for n in names], 1).half().numpy()
    np.save(out, result)


WORKERS = {
    "hf-order": lambda m, d, o: hf_loop(m, d, o, sort=False),
    "hf-sorted": lambda m, d, o: hf_loop(m, d, o, sort=True),
    "hf-sorted-stack": lambda m, d, o: hf_loop(m, d, o, sort=True, stack_only=True),
    "nnsight": nnsight_loop,
    "tlens": tlens_loop,
}
OPTIONAL = {"nnsight": "nnsight", "tlens": "transformer_lens"}


# -- the harness ----------------------------------------------------------------------------------------


def build_inputs(root: Path, n_prompts: int) -> tuple[Path, Path]:
    """The benchmark model and a CSV of its prompts (the same as extract_overhead.py's)."""
    from mechdiff.engine.tiny import build_tiny_model, random_prompts

    model = build_tiny_model(root / "llama", "llama", n_layers=N_LAYERS, d_model=D_MODEL, n_heads=8, d_mlp=1536,
                             vocab_size=VOCAB, max_positions=512)
    data = root / "prompts.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([t] for t in random_prompts(n_prompts, 16, 128, vocab_size=VOCAB, seed=0))
    return model, data


def reference(model_dir: Path, texts: list[str], rows: list[int]):
    """Last-token output of every decoder layer, one unpadded forward per example: ``[row, layer, d]`` fp32.

    Layers before the last come from ``output_hidden_states`` (no hook involved); HF's last hidden state has
    the final norm applied, so the last layer's raw output is taken by a hook on that layer."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    got = {}
    model.model.layers[-1].register_forward_hook(
        lambda m, a, o: got.__setitem__("last", (o[0] if isinstance(o, tuple) else o)[0, -1].clone()))
    out = np.empty((len(rows), N_LAYERS, D_MODEL), np.float32)
    with torch.inference_mode():
        for j, r in enumerate(rows):
            hs = model(**tok([texts[r]], return_tensors="pt"), output_hidden_states=True).hidden_states
            out[j, : N_LAYERS - 1] = torch.stack(hs[1:N_LAYERS])[:, 0, -1].numpy()
            out[j, N_LAYERS - 1] = got["last"].numpy()
    lengths = [len(x) for x in tok(texts)["input_ids"]]
    return out, lengths


def load_output(method: str, out: Path):
    import numpy as np

    if method.startswith("mechdiff"):
        from mechdiff.engine.store import open_store, resolve_group

        return open_store(str(out), resolve_group(str(out), None))["resid_post"].values
    return np.load(out)


def check(method: str, got, ref, rows: list[int], n: int) -> float:
    """Largest |diff| / max |ref| over the checked rows; raises when the output is not the reference's."""
    import numpy as np

    if got.shape != (n, N_LAYERS, D_MODEL):
        raise SystemExit(f"{method}: output shape {got.shape}, expected {(n, N_LAYERS, D_MODEL)}")
    err = float(np.abs(got[rows].astype(np.float32) - ref).max() / np.abs(ref).max())
    if not err <= 2e-3:  # float16 rounds to ~5e-4 of a value; a wrong position or row is off by O(1)
        raise SystemExit(f"{method}: output differs from the HF reference (max |diff| / max |x| = {err:.3g})")
    return err


def command(method: str, model: Path, data: str, out: Path, sources: dict[str, str]) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # each process as a user starts it
    env.setdefault("HF_HUB_OFFLINE", "1")
    if method.startswith("mechdiff"):
        src = str(REPO) if method == "mechdiff" else sources[method.split("@", 1)[1]]
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return [sys.executable, "-m", "mechdiff.cli", "extract", "--model", str(model), "--data", data,
                "--out", str(out)], env
    return [sys.executable, os.path.abspath(__file__), "--worker", method, str(model), data, str(out)], env


def run_once(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, which must succeed. ``cwd`` must not hold a
    mechdiff package: ``python -m`` puts the working directory ahead of PYTHONPATH."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def _spread(v: list[float], fmt: str) -> str:
    return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each method, after one checked warm-up")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 prompts, 1 timed run")
    ap.add_argument("--check-rows", type=int, default=48, help="examples checked against the unpadded reference")
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=DIR",
                    help="also time mechdiff imported from DIR (first on PYTHONPATH), as mechdiff@LABEL; repeatable")
    ap.add_argument("--methods", help="comma-separated subset of the methods")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, *paths = args.worker
        WORKERS[method](*paths)
        return
    if args.quick:
        args.prompts, args.runs = min(args.prompts, 64), 1
    sys.path.insert(0, str(REPO))

    methods = ["mechdiff", "hf-order", "hf-sorted", "hf-sorted-stack"]
    for name, module in OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            print(f"{name}: skipped ({module} is not importable; `pip install {module}` to include it)")
        else:
            methods.append(name)
    sources = dict(x.split("=", 1) for x in args.src)
    methods += [f"mechdiff@{label}" for label in sources]
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in methods if m in wanted or m.startswith("mechdiff@")]

    root = Path(tempfile.mkdtemp(prefix="mechdiff-e2e-"))
    model, data = build_inputs(root, args.prompts)
    texts = _read_texts(str(data))
    import numpy as np

    # the checked examples: the shortest, the longest and a random sample
    n_words = np.asarray([len(t.split()) for t in texts])
    k = min(args.check_rows, len(texts))
    pick = np.random.default_rng(0).choice(len(texts), k, replace=False).tolist()
    rows = sorted({int(n_words.argmin()), int(n_words.argmax()), *pick})
    ref, lengths = reference(model, texts, rows)
    n_tokens = sum(lengths)
    print(f"{len(texts)} prompts, {n_tokens:,} tokens; {os.cpu_count()} CPUs; methods: {', '.join(methods)}")

    def one(method: str, tag: str, verify: bool) -> tuple[float, float]:
        out = root / f"{method.replace('@', '-')}-{tag}" / ("store.zarr" if method.startswith("mechdiff") else "acts.npy")
        out.parent.mkdir(parents=True)
        wall, rss = run_once(*command(method, model, str(data), out, sources), cwd=out.parent)
        if verify:
            if method.startswith("mechdiff"):  # the code each variant really imports
                cmd, env = command(method, model, str(data), out, sources)
                where = subprocess.run([sys.executable, "-c", "import mechdiff; print(mechdiff.__file__)"], env=env,
                                       cwd=out.parent, capture_output=True, text=True, check=True).stdout.strip()
                print(f"{method} imports {where}")
            err = check(method, load_output(method, out), ref, rows, len(texts))
            print(f"checked {method:<16} against the HF reference on {len(rows)} examples: "
                  f"max |diff| / max |x| = {err:.2g}", flush=True)
        subprocess.run(["rm", "-rf", str(out.parent)], check=True)
        return wall, rss

    for m in methods:  # the warm-up round: outputs checked, nothing timed
        one(m, "warm", verify=True)
    wall: dict[str, list[float]] = {m: [] for m in methods}
    rss: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.runs):
        for m in methods:
            w, mem = one(m, str(r), verify=False)
            wall[m].append(w)
            rss[m].append(mem)
        print(f"round {r + 1}: " + ", ".join(f"{m} {wall[m][-1]:.1f}s" for m in methods), flush=True)

    print()
    print(f"{'method':<18} {'wall s, median [min-max]':<26} {'tok/s':>7}  {'peak RSS MiB, median [min-max]':<30}")
    for m in methods:
        print(f"{m:<18} {_spread(wall[m], '.2f'):<26} {n_tokens / statistics.median(wall[m]):7,.0f}  "
              f"{_spread(rss[m], ',.0f'):<30}")
    print()
    base = "mechdiff"
    for m in methods:
        if m == base:
            continue
        paired = [a / b for a, b in zip(wall[base], wall[m])]  # same round: the same machine load
        print(f"{base} / {m:<18} wall {statistics.median(wall[base]) / statistics.median(wall[m]):.3f} "
              f"(paired per round {_spread(paired, '.3f')}), peak RSS "
              f"{statistics.median(rss[base]) / statistics.median(rss[m]):.3f}")
    targets = {"hf-sorted": (0.90, 1.2), "nnsight": (0.62, None), "tlens": (0.53, None)}
    print()
    for m, (t_wall, t_rss) in targets.items():
        if m not in wall:
            continue
        w = statistics.median(wall[base]) / statistics.median(wall[m])
        line = f"target {base} / {m} wall <= {t_wall}: {'met' if w <= t_wall else 'NOT met'} ({w:.3f})"
        if t_rss is not None:
            q = statistics.median(rss[base]) / statistics.median(rss[m])
            line += f"; peak RSS <= {t_rss}x: {'met' if q <= t_rss else 'NOT met'} ({q:.3f})"
        print(line)
    subprocess.run(["rm", "-rf", str(root)], check=True)


if __name__ == "__main__":
    main()
