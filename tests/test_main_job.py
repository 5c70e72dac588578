"""The main job end to end on the embedded pair (quick sizes), and its report in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from mechdiff.cli import app
from mechdiff.pipeline import STUDIES, finite_numbers

runner = CliRunner()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = runner.invoke(app, ["run", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_results_hold_all_four_studies_with_finite_numbers(run_dir):
    out, printed = run_dir
    res = json.loads((out / "results.json").read_text())
    assert set(res["studies"]) == set(STUDIES)
    for study in STUDIES:
        findings = res["studies"][study]["findings"]
        assert findings, f"{study} reported no finding"
        for f in findings:
            nums = [v for v in f["figures"].values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            assert nums, f"{study}: finding {f['finding']} has no number"
            assert not finite_numbers(f["figures"]), f"{study}: non-finite {finite_numbers(f['figures'])}"
            assert isinstance(f["agrees"], bool)
            assert f["verdict"] in ("agrees", "disagrees", "inconclusive") and f["agrees"] == (f["verdict"] == "agrees")
            assert f["reason"], f"{study}: finding {f['finding']} has no reason"
    # truthfulness records the controls its verdict was decided against, and the cosine's interval
    (tf,) = res["studies"]["truthfulness"]["findings"]
    assert {"cosine_null_upper", "cosine_ceiling"} <= set(tf["controls"]) and len(tf["interval"]) == 2
    assert res["studies"]["truthfulness"]["summary"]["controls"]
    assert (out / "store.zarr").is_dir()
    for study in STUDIES:
        assert (out / study / "summary.json").is_file() and (out / study / "results.zarr").is_dir()
    # the printed summary table has a row per study (cells wrap at the test terminal's width)
    assert "Findings (vs the paper)" in printed and "verdict" in printed
    for study in STUDIES:
        assert study in printed


def test_the_embedded_pair_verdicts_follow_its_measurements(run_dir):
    """The shipped pair's verdicts are what its measurements say, decided against same-run controls; they are
    pinned here, with the reason each rule gave, so that a change to the pair or to a rule shows up.

    Refusal is inconclusive: the base model refuses no harmful prompt, so it has no refusal direction to
    compare (its own-template cosine of 0.2 with the post model is mostly the template's doing). Confidence is
    inconclusive: the candidates' ablation does not beat norm-matched random neurons in the post model, so they
    are not shown to be entropy neurons there (their IoU of 0.82 equals that of the top neurons by norm alone)."""
    out, _ = run_dir
    res = json.loads((out / "results.json").read_text())
    got = {study: [(f["verdict"], f["reason"]) for f in res["studies"][study]["findings"]] for study in STUDIES}
    expected = {"knowledge": ["agrees"], "truthfulness": ["agrees"], "refusal": ["inconclusive"],
                "confidence": ["inconclusive", "inconclusive"]}
    assert {s: [v for v, _ in fs] for s, fs in got.items()} == expected, got
    assert "base refuses" in got["refusal"][0][1], got["refusal"]
    assert all("not entropy neurons in post" in why for _, why in got["confidence"]), got["confidence"]


def test_report_renders_every_figure_in_headless_chromium(run_dir, tmp_path):
    out, _ = run_dir
    html = (out / "report.html").read_text()
    assert "src='http" not in html and 'src="http' not in html  # self-contained: nothing fetched
    for study in STUDIES:
        assert f"id='{study}'" in html
    assert "id='provenance'" in html
    n_figs = html.count("<figure>")
    assert n_figs >= 8
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium); the report was checked as HTML only")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           (out / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'data-figures-(\w+)="([^"]*)"', body.group(0)))
    assert int(attrs["total"]) == n_figs
    assert int(attrs["loaded"]) == n_figs, f"figures that did not load: {attrs.get('broken')}"


def test_second_run_reuses_the_store(run_dir):
    """Runs last on this output: it rewrites results.json and the report with one study."""
    from mechdiff.engine.store import store_info

    out, _ = run_dir
    before = {g.group: g.fraction_done for g in store_info(str(out / "store.zarr"))}
    assert before and all(v == 1.0 for v in before.values())
    r = runner.invoke(app, ["run", "--quick", "--out", str(out), "--studies", "truthfulness"])
    assert r.exit_code == 0, r.output
    after = {g.group: g.fraction_done for g in store_info(str(out / "store.zarr"))}
    assert after == before


def test_run_with_a_sweep_file_extracts_on_ray_then_runs_its_studies(tmp_path):
    """`mechdiff run SWEEP`: the sweep's extraction on a local Ray, then the studies it configures."""
    import ray

    from mechdiff.zoo.paths import zoo_path

    data = zoo_path("data")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"""name: embedded-sweep
output: {tmp_path / 'sweep-store'}
shard_size: 64
models:
  zoo:
    base: {zoo_path('base')}
    post:
      post: {zoo_path('post')}
datasets:
  facts: {data / 'facts.csv'}
captures:
  last:
    sites: [resid_post]
    layers: all
    positions: last
studies:
  confidence: {{capture: last, datasets: [facts], limit: 96}}
resources: {{num_cpus: 1, torch_threads: 1, actors: 2}}
"""
    )
    out = tmp_path / "out"
    try:
        r = runner.invoke(app, ["run", str(sweep), "--out", str(out), "--quick"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert r.exit_code == 0, r.output
    res = json.loads((out / "zoo" / "results.json").read_text())
    assert set(res["studies"]) == {"confidence"}  # only what the sweep configures
    f = res["studies"]["confidence"]["findings"][0]
    assert 0.0 <= f["figures"]["iou"] <= 1.0
    from mechdiff.engine.store import store_info

    groups = {g.group: g.fraction_done for g in store_info(str(tmp_path / "sweep-store" / "last.zarr"))}
    assert groups == {"zoo/base/facts": 1.0, "zoo/post/facts": 1.0}
    # a malformed sweep is refused before anything runs, naming the line and key
    bad = tmp_path / "bad.yaml"
    bad.write_text(sweep.read_text().replace("positions: last", "positions: first"))
    r = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "bad.yaml:" in " ".join(r.output.split())
    assert not (tmp_path / "out2").exists()
