"""`mechdiff run SWEEP` on a 2-node local Ray cluster: the sweep plans every study's captures, the actor pool
extracts them, and the studies read exactly those stores (nothing is extracted in the driver or in the studies'
task); their results equal a single-process run of the same studies on the same stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mechdiff.analyses.study import StudyConfigError
from mechdiff.cluster.sweep import SweepError, load_sweep, parse_sweep
from mechdiff.engine.store import ActivationStore
from mechdiff.zoo.paths import zoo_path

pytestmark = pytest.mark.usefixtures("one_thread")

STUDIES = ("knowledge", "truthfulness", "refusal", "confidence")


def _sample(src: Path, dst: Path, n: int, by: str | None = None, head: bool = False) -> None:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)  # as written: TRUE stays TRUE, not a bool
    if head:
        df = df.head(n)
    else:  # the same number of rows from each value of ``by`` (labels, splits), seeded
        df = df.groupby(by).sample(n // df[by].nunique(), random_state=0).sort_index()
    df.to_csv(dst, index=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The embedded pair, a random-init pair of its architecture and tokenizer, and small copies of its data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sweep-studies")
    post = zoo_path("post")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(post)).save_pretrained(root / "random" / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(post / f, root / "random" / name / f)
    d = zoo_path("data")
    (root / "data").mkdir()
    _sample(d / "truth_cities.csv", root / "data/truth_cities.csv", 24, by="label")
    _sample(d / "truth_larger_than.csv", root / "data/truth_larger_than.csv", 24, by="label")
    _sample(d / "instructions_harmful.csv", root / "data/harmful.csv", 16, by="split")
    _sample(d / "instructions_harmless.csv", root / "data/harmless.csv", 16, by="split")
    _sample(d / "patching.csv", root / "data/patching.csv", 12, head=True)
    _sample(d / "facts.csv", root / "data/facts.csv", 12, head=True)
    shutil.copy(d / "shots.json", root / "data/shots.json")  # knowledge's few-shot prompts, found beside its pairs
    return root


def _sweep(world: Path, output: str = "stores", studies: str | None = None) -> str:
    base, post = zoo_path("base"), zoo_path("post")
    studies = studies or """\
  truthfulness: {datasets: [cities, larger], n_intervene: 4, n_null: 3, n_splits: 2, n_bootstrap: 20}
  knowledge: {datasets: [pairs], limit: 4, attribution: false, layers: "0,3", sites: [resid_post],
              controls: {n_permutations: 20, n_bootstrap: 20, n_splits: 2}}
  refusal: {harmful: harmful, harmless: harmless, n_val: 3, n_eval: 3, max_new_tokens: 4, rerank: 1,
            n_bootstrap: 50, n_null: 3, n_splits: 2}
  confidence: {datasets: [texts], limit: 8, controls: 3, iou_draws: 50, n_bootstrap: 20}
"""
    return f"""\
name: two-groups
output: {output}
shard_size: 16
token_budget: 2048
models:
  embedded:
    base: {base}
    post: {{post: {post}}}
  random:
    base: ./random/a
    post: {{post: ./random/b}}
datasets:
  cities: data/truth_cities.csv
  larger: data/truth_larger_than.csv
  pairs: data/patching.csv
  harmful: data/harmful.csv
  harmless: data/harmless.csv
  texts: data/facts.csv
studies:
{studies}resources:
  num_cpus: 1
  torch_threads: 1
"""


def _findings(res: dict) -> dict:
    return {s: [(f["finding"], f["pair"], f["verdict"], f["figures"]) for f in res["studies"][s]["findings"]]
            for s in res["studies"]}


def test_study_options_are_checked_against_the_study_config(world):
    text = _sweep(world)
    bad = text.replace("n_intervene: 4", "n_intervenes: 4")
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if "n_intervenes" in ln)
    with pytest.raises(SweepError, match=rf"^s\.yaml:{line}: studies\.truthfulness\.n_intervenes: .*no option "
                                          r"'n_intervenes'"):
        parse_sweep(bad, file="s.yaml", base_dir=world)
    with pytest.raises(SweepError, match=r"studies\.confidence\.limit: .*'eight' is not"):
        parse_sweep(text.replace("limit: 8", "limit: eight"), file="s.yaml", base_dir=world)
    with pytest.raises(SweepError, match=r"studies\.refusal\.templates: .*'chat' is not dict\[str, str\]"):
        parse_sweep(text.replace("n_val: 3,", "templates: chat, n_val: 3,"), file="s.yaml", base_dir=world)
    assert issubclass(StudyConfigError, ValueError)


@pytest.mark.parametrize("old, new, needle", [
    ("n_intervene: 4,", "n_intervene: 4, probe_layer: 6,", r"studies\.truthfulness \(model group embedded\): probe_layer 6: "
     r"model 'base' has layers 0\.\.5"),
    ("n_intervene: 4,", "n_intervene: 4, heldout_topics: [moon],", r"heldout_topics moon: not among the statements' topics"),
    ("limit: 4,", "limit: 4, normalisation: nie,", r"studies\.knowledge \(model group embedded\): normalisation 'nie'"),
    ('layers: "0,3"', 'layers: "0,9"', r"studies\.knowledge .*layers: .*9.*model 'base' has 6 layers"),
    ("limit: 8,", "limit: 8, layer: -7,", r"studies\.confidence .*layer -7: model 'base' has layers 0\.\.5"),
    ("n_val: 3,", "n_val: 3, kl_max: -1,", r"studies\.refusal .*kl_max=-1"),
    ("n_val: 3,", "n_val: 3, templates: {nobody: chat},", r"studies\.refusal .*nobody"),
])
def test_study_settings_the_data_or_models_refute_stop_the_plan(world, old, new, needle):
    """Refused while the sweep is planned, before Ray starts or any store exists: not after hours of extraction."""
    from mechdiff.cluster.study_plan import study_targets

    text = _sweep(world)
    assert old in text
    path = world / "refuted.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(SweepError, match=needle):
        study_targets(load_sweep(path))
    assert not (world / "stores").exists()


def test_a_pinned_capture_that_lacks_the_studys_positions_is_an_error(world):
    text = _sweep(world, studies="  truthfulness: {capture: last, datasets: [cities]}\n").replace(
        "studies:\n", "captures:\n  last: {sites: [resid_post], positions: last, datasets: [cities]}\nstudies:\n")
    (world / "pinned.yaml").write_text(text)
    from mechdiff.cluster.study_plan import study_targets

    with pytest.raises(SweepError, match=r"studies\.truthfulness\.capture last does not hold what truthfulness: "
                                         r"base's statements .*positions is 'last', the study needs 'last:2'"):
        study_targets(load_sweep(world / "pinned.yaml"))


def test_sweep_feeds_the_studies_the_pools_stores(world, tmp_path):
    from mechdiff.cli import app
    from mechdiff.cluster.ray_env import LocalCluster
    from mechdiff.cluster.study_plan import study_targets, sweep_jobs
    from mechdiff.pipeline import RunOptions, run_job

    path = world / "sweep.yaml"
    path.write_text(_sweep(world))
    out = tmp_path / "out"
    # the plan: each study's own captures, in <output>/<study>.zarr, for both groups
    planned = {(st.target.url, st.target.group) for st in study_targets(load_sweep(path))}
    assert {Path(u).name for u, _ in planned} == {"truthfulness.zarr", "refusal.zarr"}
    assert {g.split("/")[0] for _, g in planned} == {"embedded", "random"}

    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        r = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--address", cluster.address],
                               env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for g in ("embedded", "random"):
        res = json.loads((out / g / "results.json").read_text())
        assert set(res["studies"]) == set(STUDIES)
        assert res["extracted_here"] == []  # every capture came from the pool
        read = {(x["url"], x["group"]) for s in STUDIES for x in res["stores_read"][s]}
        assert read == {p for p in planned if p[1].startswith(f"{g}/")}
        for url, group in read:  # written by the pool: complete
            assert ActivationStore.open(url, group).missing_shards() == []
        assert {x["study"] for s in STUDIES for x in res["stores_read"][s]} == {"truthfulness", "refusal"}

    # the same studies on the same stores in this process give the same results
    jobs = sweep_jobs(path, tmp_path / "here", progress=False)  # nothing left to extract: no Ray is started
    for job in jobs:
        outcome = run_job(job, RunOptions(progress=False))
        here = json.loads(outcome.results_json.read_text())
        there = json.loads((out / job.group.name / "results.json").read_text())
        assert here["extracted_here"] == []
        a, b = _findings(here), _findings(there)
        assert a.keys() == b.keys()
        for s in a:
            for fa, fb in zip(a[s], b[s], strict=True):
                assert fa[:3] == fb[:3], (s, fa[:3], fb[:3])
                for k, v in fa[3].items():
                    w = fb[3][k]
                    if isinstance(v, float) and isinstance(w, float):
                        np.testing.assert_allclose(v, w, rtol=1e-6, atol=1e-9, err_msg=f"{s} {k}")
                    else:
                        assert v == w, (s, k)
