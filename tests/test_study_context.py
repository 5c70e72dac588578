"""The study context: where a study's dask graphs run, and what it read."""

from __future__ import annotations

import dataclasses

import dask
import dask.array as da
import numpy as np
import xarray as xr

from mechdiff.analyses.common import ModelGroup, StudyResult
from mechdiff.analyses.study import StudyContext, StudyDef, run_study


@dataclasses.dataclass(frozen=True)
class _Config:
    n: int = 4


def _probe_run(ctx, config):
    seen = []

    def record(x):
        seen.append(dask.config.get("scheduler", None))
        return x

    total = da.ones(config.n, chunks=2).map_blocks(record).sum().compute()
    data = xr.Dataset({"total": ((), float(total))})
    return StudyResult("probe", data, {"scheduler": seen[0], "total": float(total)}, {}, [], {})


def test_a_study_runs_its_dask_graphs_on_the_contexts_scheduler(tmp_path):
    study = StudyDef("probe", _Config, (), lambda config, group, datasets: [], _probe_run)
    group = ModelGroup("g", "base", ("post",))
    res = run_study(study, _Config(), StudyContext(group, {}, tmp_path, scheduler="synchronous"))
    assert res.summary["scheduler"] == "synchronous" and res.summary["total"] == 4.0
    # no scheduler given: the caller's dask configuration stands
    with dask.config.set(scheduler="threads"):
        res = run_study(study, _Config(), StudyContext(group, {}, tmp_path / "b"))
    assert res.summary["scheduler"] == "threads"
    assert np.isclose(float(res.data["total"]), 4.0)


def test_the_main_job_checks_every_studys_settings_before_a_model_loads(tmp_path, monkeypatch):
    import pytest

    from mechdiff.analyses.confidence import ConfidenceConfig, ConfidenceOptionError
    from mechdiff.analyses.truthfulness import TruthSettingsError
    from mechdiff.pipeline import RunOptions, embedded_group, embedded_inputs, run_group, study_configs

    def no_models(self):
        raise AssertionError("models loaded before the settings were checked")

    monkeypatch.setattr(StudyContext, "all_models", no_models)
    cfg = study_configs(quick=True)
    with pytest.raises(TruthSettingsError, match="probe_layer 6: model 'base' has layers 0..5"):
        run_group(embedded_group(), embedded_inputs(), tmp_path / "a", RunOptions(studies=("confidence", "truthfulness")),
                  configs={**cfg, "truthfulness": dataclasses.replace(cfg["truthfulness"], probe_layer=6)})
    with pytest.raises(ConfidenceOptionError, match="layer 6: model 'base'"):
        run_group(embedded_group(), embedded_inputs(), tmp_path / "b", RunOptions(studies=("confidence",)),
                  configs={**cfg, "confidence": ConfidenceConfig(layer=6)})


def test_layer_counts_read_a_config_only_when_a_check_asks(monkeypatch):
    from mechdiff.analyses.study import layer_counts
    from mechdiff.engine import precheck
    from mechdiff.pipeline import embedded_group

    reads = []
    real = precheck.read_config
    monkeypatch.setattr(precheck, "read_config", lambda path, **kw: reads.append(path) or real(path, **kw))
    counts = layer_counts(embedded_group())
    assert reads == [] and list(counts) == ["base", "post"]
    assert counts["post"] == 6 and counts["post"] == 6 and len(reads) == 1  # read once, when asked
