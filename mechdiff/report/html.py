"""The HTML report: one self-contained file (figures embedded as data URIs) that reads offline.

It mirrors the study: one section per finding, each figure with a line saying how to read it, a table
of the findings measured on each model pair, and the provenance of models, datasets and versions.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from mechdiff.analyses.common import Finding, StudyResult, to_jsonable

__all__ = ["FigureNote", "STUDY_TITLES", "render_report", "write_report"]

STUDY_TITLES = {
    "knowledge": ("Knowledge storage", "Does post-training move where facts are stored? Activation patching of true/false fact pairs."),
    "truthfulness": ("Truthfulness", "Is there a linear truth direction, and is it shared between the base and post-trained model?"),
    "refusal": ("Refusal", "Is there a refusal direction, and is it shared? Ablation and addition during generation, own vs transferred."),
    "confidence": ("Confidence", "Do entropy neurons explain the confidence change? Candidate neurons, their overlap, their ablation."),
}
ORDER = ("knowledge", "truthfulness", "refusal", "confidence")


@dataclass(frozen=True)
class FigureNote:
    title: str
    how_to_read: str


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"data:image/png;base64,{data}"


# How to read each figure, for studies that did not say (keys match by prefix).
DEFAULT_NOTES = {
    ("knowledge", "heatmap"): "Each cell: the normalised effect of patching the true prompt's activation at (layer, position) "
    "into the false run (0 = the false run, 1 = the true run). Side by side: base, post, each model's activations patched "
    "into the other, and the post - base difference binned into 20 levels, with the largest |difference| per token "
    "group in its title; similar heatmaps mean facts are stored in the same places.",
    ("knowledge", "attribution"): "Attribution patching estimates (one forward and one backward pass) against exact patching "
    "effects for every (layer, position); points on the diagonal mean the fast estimate can stand in for the sweep.",
    ("refusal", "cosine"): "Cosine between the base and post model's refusal directions per layer, each model under its "
    "own template; the template-matched cosines the verdict uses are in the findings table.",
    ("refusal", "refusal_scores"): "Fraction of greedy completions that refuse: harmful prompts with the direction ablated, "
    "harmless prompts with it added, for the model's own direction and the other model's.",
    ("refusal", "selection"): "Candidate (layer, position) directions scored on validation prompts by how much ablating "
    "them removes refusal and adding them induces it; the chosen one is marked.",
    ("confidence", "scatter"): "Last-layer MLP neurons: output-weight norm against the variance of their logit effect over "
    "the vocabulary; entropy-neuron candidates (high norm, low variance) are marked.",
    ("confidence", "iou"): "Overlap (intersection over union) of the models' entropy-neuron candidate sets; 1 = the same neurons.",
}


def _note(study: StudyResult, key: str) -> FigureNote:
    text = study.notes.get(key, "")
    if not text:
        text = next((v for (st, pre), v in DEFAULT_NOTES.items() if st == study.study and key.startswith(pre)), "")
    return FigureNote(key.replace("_", " ").capitalize(), text)


def _findings_table(findings: Sequence[Finding]) -> str:
    if not findings:
        return "<p class='muted'>No findings recorded.</p>"
    rows = []
    for f in findings:
        nums = ", ".join(f"{k} = {_fmt(v)}" for k, v in f.figures.items())
        if f.interval is not None:
            nums = f"95% interval of the headline number [{_fmt(f.interval[0])}, {_fmt(f.interval[1])}]; " + nums
        ctl = ", ".join(f"{k} = {_fmt(v)}" for k, v in f.controls.items()) or "none recorded"
        cls = {"agrees": "yes", "disagrees": "no"}.get(f.verdict, "inc")
        verdict = f"<span class='{cls}'>{html.escape(f.verdict)}</span>"
        note = f"{f.reason}; {f.detail}" if f.reason else f.detail
        rows.append(
            f"<tr><td>{html.escape(f.finding)}</td><td>{html.escape(f.pair)}</td><td>{html.escape(nums)}</td>"
            f"<td>{html.escape(ctl)}</td><td>{verdict}</td><td>{html.escape(note)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>finding</th><th>pair</th><th>measured</th><th>controls (same run)</th>"
        "<th>verdict vs the paper</th><th>reason</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _rows_table(title: str, rows: Sequence[dict[str, Any]]) -> str:
    """A study's table of plain rows (e.g. completions), columns in the first row's order."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<h3>{html.escape(title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _provenance_table(provenance: dict[str, Any]) -> str:
    rows = []
    for section, items in provenance.items():
        if isinstance(items, dict):
            for k, v in items.items():
                rows.append(f"<tr><td>{html.escape(section)}</td><td>{html.escape(str(k))}</td><td><code>{html.escape(_short(v))}</code></td></tr>")
        else:
            rows.append(f"<tr><td>{html.escape(section)}</td><td></td><td><code>{html.escape(_short(items))}</code></td></tr>")
    return f"<table><thead><tr><th>what</th><th>key</th><th>value</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(to_jsonable(v))
    return s if len(s) <= 300 else s[:297] + "..."


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.muted{color:#666} figure{display:inline-block;margin:1em 1em 1em 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.9em;color:#444;max-width:560px}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} .yes{color:#1a7f37;font-weight:600} .no{color:#b42318;font-weight:600} .inc{color:#9a6700;font-weight:600} code{font-size:.85em;word-break:break-all}
"""

# On load, count figures that decoded to a non-empty image; a headless browser reads these attributes.
_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('figure img'); var ok = 0, bad = [];
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0 && im.naturalHeight > 0) ok++; else bad.push(im.alt); });
  document.body.setAttribute('data-figures-total', imgs.length);
  document.body.setAttribute('data-figures-loaded', ok);
  document.body.setAttribute('data-figures-broken', bad.join('|'));
});
"""


def render_report(
    results: dict[str, StudyResult],
    *,
    title: str = "mechdiff report",
    provenance: dict[str, Any] | None = None,
    summary_rows: Sequence[Finding] | None = None,
) -> str:
    """The report as one HTML string; figures are embedded, nothing is fetched."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by mechdiff.</p>"]
    findings = list(summary_rows) if summary_rows is not None else [f for r in results.values() for f in r.findings]
    parts.append("<h2>Findings</h2>")
    parts.append("<p>Each row is one of the study's findings measured on one base / post-trained pair, and whether "
                 "that pair agrees with what the paper reports, disagrees, or is inconclusive (the measurement cannot tell), "
                 "decided against the controls computed in the same run and shown beside it.</p>")
    parts.append(_findings_table(findings))
    for name in [*ORDER, *sorted(set(results) - set(ORDER))]:
        if name not in results:
            continue
        r = results[name]
        head, question = STUDY_TITLES.get(name, (name.title(), ""))
        parts.append(f"<h2 id='{name}'>{html.escape(head)}</h2><p>{html.escape(question)}</p>")
        parts.append(_findings_table(r.findings))
        for key, path in r.figures.items():
            note = _note(r, key)
            parts.append(
                f"<figure><img alt='{html.escape(name + '/' + key)}' src='{_img(path)}'>"
                f"<figcaption><b>{html.escape(note.title)}.</b> {html.escape(note.how_to_read)}</figcaption></figure>"
            )
        for title_, rows in r.tables.items():
            parts.append(_rows_table(title_, rows))
    if provenance:
        parts.append("<h2 id='provenance'>Provenance</h2>")
        parts.append(_provenance_table(provenance))
    body = "\n".join(parts)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_CHECK_JS}</script></head>"
        f"<body>{body}</body></html>"
    )


def write_report(path: str | Path, results: dict[str, StudyResult], **kw: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results, **kw), encoding="utf-8")
    return path
