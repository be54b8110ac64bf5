"""The analysis report as one self-contained HTML file: plots inline as SVG, no external assets.

It opens offline in any browser: a summary, the per-layer SQNR, the
sensitivity bars (each layer quantized alone), a table with a row per layer,
and per quantizer a histogram of the values it saw with its grid's ends
drawn on it. The plots are matplotlib's SVG with text kept as text.
"""

from __future__ import annotations

import html
import io
import math

from qstrat.errors import QstratError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
td.name, td.type, td.q { text-align: left; }
tr.top td { background: #fff3e0; }
.hists { display: flex; flex-wrap: wrap; gap: 6px; }
.hists figure { margin: 0; }
figcaption { font-size: 0.75em; text-align: center; }
"""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, and searchable
        import matplotlib.pyplot as plt
    except ImportError:
        raise QstratError(
            "the HTML report draws its plots with matplotlib, which is not installed: pip install matplotlib "
            '(or pip install "qstrat[report]"). Analysis.to_dict() and write_json() need no plots.'
        ) from None
    return plt


def require_matplotlib() -> None:
    """Raise the error `_pyplot` gives where matplotlib is missing: before long work whose report needs it."""
    _pyplot()


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _db(v) -> str:
    if v is None:
        return "-"
    return "exact" if math.isinf(v) and v > 0 else f"{v:.1f}"


def _clip_db(v: float | None, cap: float = 120.0) -> float:
    return cap if v is None or v > cap else v


def sqnr_plot(analysis) -> str:
    plt = _pyplot()
    names = [la.name for la in analysis.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names)), 3.0))
    ax.plot(range(len(names)), [_clip_db(la.sqnr_db) for la in analysis.layers], marker="o", ms=3)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Cumulative SQNR at each layer's output (all quantizers on)", fontsize=9)
    ax.grid(alpha=0.3)
    return _svg(fig)


def sensitivity_plot(analysis) -> str:
    plt = _pyplot()
    order = [analysis.layer(n) for n in analysis.ranking()]
    fig, ax = plt.subplots(figsize=(6.5, max(2.0, 0.16 * len(order) + 0.8)))
    y = list(range(len(order)))[::-1]
    ax.barh(y, [_clip_db(la.alone_sqnr_db) for la in order], color="#e67e22", label="layer alone")
    w = [(yy, la.weight_only_sqnr_db) for yy, la in zip(y, order, strict=True) if la.weight_only_sqnr_db is not None]
    a = [
        (yy, la.activation_only_sqnr_db)
        for yy, la in zip(y, order, strict=True)
        if la.activation_only_sqnr_db is not None
    ]
    if w:
        ax.plot([_clip_db(v) for _, v in w], [yy for yy, _ in w], "s", color="#2c3e50", ms=3, label="weights only")
    if a:
        ax.plot([_clip_db(v) for _, v in a], [yy for yy, _ in a], "^", color="#27ae60", ms=3, label="activations only")
    ax.set_yticks(y, [la.name for la in order], fontsize=6)
    ax.set_xlabel("model output SQNR with only this layer quantized (dB); shorter bars: more sensitive")
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def histogram_plot(r) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.6, 1.6))
    edges = r.hist_edges
    if r.hist_counts:
        ax.stairs(r.hist_counts, edges, fill=True, color="#5dade2")
        ax.set_yscale("symlog", linthresh=1)
    for v in (r.grid_min, r.grid_max):
        ax.axvline(v, color="#c0392b", lw=1)
    ax.set_title(f"{r.target} ({r.bit_width}-bit)" if r.bit_width else r.target, fontsize=6)
    ax.tick_params(labelsize=5)
    return _svg(fig)


def _row(rank: int | None, la, top: set[str]) -> str:
    e = html.escape
    quants = "<br>".join(
        f"{e(r.target.split('/', 1)[1])}: {r.bit_width or '?'}-bit, grid [{r.grid_min:.4g}, {r.grid_max:.4g}], "
        f"seen [{r.observed_min:.4g}, {r.observed_max:.4g}], clipped {100 * r.clipped:.3f}%"
        for r in la.ranges
    )
    cls = ' class="top"' if la.name in top else ""
    return (
        f"<tr{cls}><td>{rank if rank is not None else '-'}</td><td class='name'>{e(la.name)}</td>"
        f"<td class='type'>{e(la.layer_type)}</td><td>{_db(la.alone_sqnr_db)}</td>"
        f"<td>{_db(la.weight_only_sqnr_db)}</td><td>{_db(la.activation_only_sqnr_db)}</td>"
        f"<td>{_db(la.left_out_sqnr_db)}</td>"
        f"<td>{_db(la.sqnr_db)}</td><td>{la.mse:.3g}</td><td>{la.cosine:.5f}</td><td class='q'>{quants}</td></tr>"
    )


def render(analysis, top: int = 5) -> str:
    """The report's HTML text."""
    e = html.escape
    ranking = analysis.ranking()
    rank = {n: k + 1 for k, n in enumerate(ranking)}
    worst = set(ranking[:top])
    agreement = "-" if analysis.agreement is None else f"{100 * analysis.agreement:.2f}%"
    passes = ", ".join(f"{k}: {v}" for k, v in analysis.passes.items())
    seconds = ", ".join(f"{k}: {v:.2f} s" for k, v in analysis.seconds.items())
    head = ["#", "layer", "type", "alone dB", "weights only dB", "activations only dB", "left out dB",
            "cumulative dB", "MSE", "cosine", "quantizers: grid against what they saw"]  # fmt: skip
    rows = "\n".join(_row(rank.get(la.name), la, worst) for la in analysis.layers)
    hists = "\n".join(
        f"<details><summary>{e(la.name)} ({len(la.ranges)})</summary><div class='hists'>"
        + "".join(f"<figure>{histogram_plot(r)}</figure>" for r in la.ranges)
        + "</div></details>"
        for la in analysis.layers
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qstrat analysis: {e(analysis.model)}</title>
<style>{STYLE}</style></head><body>
<h1>qstrat analysis: {e(analysis.model)}</h1>
<p>{analysis.samples} samples. Model outputs against the float model: SQNR {_db(analysis.output_sqnr_db)} dB,
top-1 agreement {agreement}. The float reference (the quantized model with every quantizer bypassed and bias
corrections taken out) matches the float model at {_db(analysis.bypass_sqnr_db)} dB.</p>
<p>Most sensitive layers (lowest output SQNR with only that layer quantized):
{", ".join(e(n) for n in ranking[:top]) or "-"}.</p>
<p>Passes over the data: {e(passes)}. Time: {e(seconds)}.</p>
<h2>Per-layer SQNR</h2>
<div class="plot" id="sqnr">{sqnr_plot(analysis)}</div>
<h2>Sensitivity</h2>
<div class="plot" id="sensitivity">{sensitivity_plot(analysis)}</div>
<h2>Layers</h2>
<table id="layers"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>
<tbody>
{rows}
</tbody></table>
<h2>Histograms</h2>
<p>Values each quantizer saw (activations: a sample of each batch; weights: all), with its grid's ends in red.</p>
<div id="histograms">
{hists}
</div>
</body></html>
"""


def write_report(analysis, path: str) -> str:
    """Render and write atomically; the path is checked before the plots are drawn."""
    from qstrat.files import check_writable, write_atomically

    check_writable(path, "write_report path")
    write_atomically(path, render(analysis).encode("utf-8"))
    return path
