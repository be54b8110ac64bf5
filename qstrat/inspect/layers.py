"""What each layer gets, without data: the rule that matched, its quantizers, and what the passes did to it.

`inspect_rows` joins the optimize stage's report (folded, equalized, split,
removed) with the quantize decision (quantized or skipped and why, fused
outputs, DPU versions) for every layer of the float model, then for every
layer the optimize stage made. `supported_table` is the table of layer types
each strategy quantizes, generated from the strategies' own patterns.
"""

from __future__ import annotations

from collections.abc import Iterable

from qstrat.strategy import load_strategy, names_a_file


def _quantizers(cfg) -> list[dict]:
    out = []
    for t in cfg.targets if cfg is not None and cfg.quantized else ():
        q = t.build(f"{cfg.layer_name}.{t.target_name}")
        out.append(
            {
                "target": t.target_name,
                "kind": t.target_type,
                "quantizer": t.quantizer_type,
                "bit_width": getattr(getattr(q, "params", None), "bit_width", None),
                **({"shared": t.shared_key} if t.shared_key else {}),
            }
        )
    return out


def inspect_rows(float_layers: Iterable[tuple[str, str]], graph, annotation, optimize_report) -> list[dict]:
    """One dict per layer: ``name, type, status, reason, rules, quantizers, fused, dpu_version, optimize``.

    Args:
        float_layers: (name, type) of each layer of the user's float model, in order.
        graph: the graph the quantizers were decided on (after optimize and the DPU versions).
        annotation: `qstrat.passes.quantize.annotate`'s result for ``graph``.
        optimize_report: what the optimize stage did (None when it did not run).
    """
    events: dict[str, list[str]] = {}
    for e in optimize_report.events if optimize_report is not None else ():
        events.setdefault(e.node, []).append(
            f"{e.pass_name}: {e.detail}" if e.kind == "changed" else f"{e.pass_name} skipped: {e.detail}"
        )
    in_graph = {n.name: n for n in graph.nodes}
    rows, seen = [], set()
    for name, layer_type in [*float_layers, *((n.name, n.type_name) for n in graph.nodes)]:
        if name in seen:
            continue
        seen.add(name)
        report = annotation.report.layers.get(name)
        cfg = annotation.configs.get(name)
        notes = list(report.notes) if report is not None else []
        row = {
            "name": name,
            "type": report.layer_type if report is not None else layer_type,
            "status": report.status if report is not None else "removed",
            "reason": report.reason if report is not None else None,
            "rules": list(cfg.rules) if cfg is not None else [],
            "quantizers": _quantizers(cfg),
            "fused": next((n for n in notes if "fused" in n), None),
            "dpu_version": next((n.split(": ", 1)[1] for n in notes if n.startswith("DPU version")), None),
            "optimize": events.get(name, []),
            "notes": [n for n in notes if "fused" not in n and not n.startswith("DPU version")],
        }
        if name not in in_graph:
            folded = [e for e in row["optimize"] if "folded" in e or "removed" in e or "dropped" in e]
            row["status"] = "folded" if any("folded" in e for e in folded) else "removed"
            row["reason"] = "; ".join(row["optimize"]) or "the optimize stage replaced it"
        rows.append(row)
    return rows


def rows_table(rows: list[dict]) -> str:
    """The rows as text, a line per layer."""
    lines = [f"{'layer':<28} {'type':<22} {'status':<10} detail"]
    for r in rows:
        if r["quantizers"]:
            detail = ", ".join(f"{q['target']} ({q['quantizer']}, {q['bit_width']}-bit)" for q in r["quantizers"])
        else:
            detail = r["reason"] or ""
        extra = [r["fused"], r["dpu_version"] and f"DPU version: {r['dpu_version']}", *r["notes"]]
        if r["status"] not in ("folded", "removed"):
            extra += r["optimize"]
        if r["rules"]:
            extra.append("rule: " + "; ".join(r["rules"]))
        detail = "; ".join([detail, *[x for x in extra if x]]) if detail else "; ".join(x for x in extra if x)
        lines.append(f"{r['name']:<28} {r['type']:<22} {r['status']:<10} {detail}")
    return "\n".join(lines)


def supported(strategies: Iterable[str] = ("pof2s", "fs", "tqt")) -> dict:
    """Each layer type the built-in (or given) strategies' patterns name, and its targets in each:
    ``{"strategies": [...], "layers": {type: {strategy: [target, ...]}}, "model inputs": {strategy: ...}}``."""
    names = list(strategies)
    loaded = {s: load_strategy("pof2s", s) if names_a_file(s) else load_strategy(s) for s in names}
    cells: dict[str, dict[str, list[str]]] = {}
    for s, strategy in loaded.items():
        for p in strategy.patterns:
            targets = [f"{t.target_name} ({t.target_type})" for t in p.quant_config] or [
                "no quantizer (keeps its input's grid)"
            ]
            for layer_type in p.layer_type or ("any",):
                label = layer_type + (f" after {len(p.layer_inputs)} input pattern(s)" if p.layer_inputs else "")
                label += f' named "{p.layer_name}"' if p.layer_name else ""
                have = cells.setdefault(label, {}).setdefault(s, [])
                have += [t for t in targets if t not in have]
    inputs = {s: "quantized" if loaded[s].input_quantize.quantizer else "float" for s in names}
    return {"strategies": names, "layers": {label: cells[label] for label in sorted(cells)}, "model inputs": inputs}


def supported_table(strategies: Iterable[str] = ("pof2s", "fs", "tqt")) -> str:
    """`supported` as a markdown table."""
    table = supported(strategies)
    names = table["strategies"]
    lines = ["| layer type | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, cell in table["layers"].items():
        row = [", ".join(cell.get(s, [])) or "-" for s in names]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("| model inputs | " + " | ".join(f"input ({table['model inputs'][s]})" for s in names) + " |")
    return "\n".join(lines)
