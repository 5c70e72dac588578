"""The four studies, one module each, for notebooks and scripts: ``Config`` (every option and verdict threshold)
and ``run(group, out, config, **datasets)``, which extracts what no given store holds, runs the study and writes
its results under ``out/<study>/``::

    from mechdiff.studies import truthfulness
    result = truthfulness.run(group, "results/", truthfulness.Config(n_intervene=50), statements=["cities.csv"])
"""

from mechdiff.studies import confidence, knowledge, refusal, truthfulness

__all__ = ["knowledge", "truthfulness", "refusal", "confidence"]
