"""What ``mechdiff analyze <study>`` prints: the findings table, and for refusal and truthfulness the tables a
reader checks the verdict against."""

from __future__ import annotations

from rich.table import Table

from mechdiff.cli.common import findings_table, out

__all__ = ["REPORTS"]


def _truthfulness(res) -> None:
    s = res.summary
    t = Table(title="truth direction: base vs post-trained")
    for col in ("pair", "cosine@best", "probe own (A / B)", "A->B / B->A (refit)", "NIE B own / A's", "NIE A own / B's",
                "cosine CI", "null upper / ceiling", "verdict"):
        t.add_column(col)
    for f in res.findings:
        a, b = f.pair.split(" vs ")
        fg = f.figures

        def nie(tgt: str, src: str) -> str:
            if f"nie_{tgt}_own" not in fg:
                return "-"  # --no-intervene
            return f"{fg[f'nie_{tgt}_own']:.2f} / {fg[f'nie_{tgt}_with_{src}_dir']:.2f}"

        t.add_row(
            f.pair, f"{fg['cosine_at_best_layer']:.2f}", f"{fg[f'acc_{a}_own']:.2f} / {fg[f'acc_{b}_own']:.2f}",
            f"{fg[f'acc_{a}_dir_on_{b}_refit']:.2f} / {fg[f'acc_{b}_dir_on_{a}_refit']:.2f}", nie(b, a), nie(a, b),
            f"[{f.interval[0]:.2f}, {f.interval[1]:.2f}]" if f.interval else "-",
            f"{f.controls.get('cosine_null_upper', float('nan')):.2f} / {f.controls.get('cosine_ceiling', float('nan')):.2f}",
            f.verdict,
        )
    out.print(t)
    for f in res.findings:
        out.print(f"{f.pair}: {f.verdict} ({f.reason})", highlight=False)
        out.print(f"  {f.detail}", highlight=False)
    out.print(f"best layers {s['best_layer']}")


def _refusal(res) -> None:
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


REPORTS = {"truthfulness": _truthfulness, "refusal": _refusal,
           "knowledge": lambda r: out.print(findings_table(r)), "confidence": lambda r: out.print(findings_table(r))}
