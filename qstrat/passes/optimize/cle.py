"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), with optional bias absorption.

A pair is a head layer and a tail layer (Conv2D, Conv1D, DepthwiseConv2D or
Dense) joined by nothing but positively homogeneous steps: ReLU (no cap, no
threshold, no slope), Activation relu/linear, ZeroPadding, with the head's
output channels on the axis the tail reads its input channels from (the
last, or axis 1 where both are channels_first; any padding pads others). Since
``relu(s * x) == s * relu(x)`` for ``s > 0``, multiplying head output channel
c by ``s_c`` and dividing the tail's input channel c by ``s_c`` leaves the
float model unchanged.

Per channel, with H = |head kernel| as (taps, out) plus its bias as one more
row and T = |tail kernel| as (taps, in), and r the max (or mean) over taps:

    s_c = sqrt(r(T)_c / r(H)_c), clipped to [0.1, 10];
    s_c = 1 where max(H)_c + max(T)_c < cle_weight_threshold.

Both ranges become sqrt(r(H)_c * r(T)_c). ``cle_steps`` passes run over all
pairs, so chains (depthwise -> pointwise -> depthwise ...) settle.
``cle_to_relu6`` also accepts ReLU6 links: not float-equivalent when a
channel is scaled up past 6, which is why it is off by default.

Bias absorption (``cle_bias_absorption``): where the head's BatchNormalization
was folded, its output in channel c is about N(beta_c, gamma_c^2), so
``relu(x) >= h_c = max(0, beta_c - 3|gamma_c|)`` almost always. Moving ``h_c``
from the head's bias into the tail's bias shrinks the activation range without
changing the outputs where ``x >= h_c``. It is applied only where the tail adds
the shift exactly (Dense, 1x1 or "valid" kernels, no zero padding between):
a padded border would otherwise see ``-h_c`` instead of 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph.ir import Graph, Node
from qstrat.graph.rewrite import Editor, built_layer
from qstrat.layers.bias_axis import MISPLACED
from qstrat.passes.optimize.act_eq import activation_factor
from qstrat.passes.optimize.channels import (
    DEPTHWISE,
    channel_axis,
    misplaced_bias,
    scale_in,
    scale_out,
    shift_through,
)
from qstrat.passes.optimize.report import OptimizeReport

ENDS = ("Conv1D", "Conv2D", "DepthwiseConv2D", "Dense")


@dataclass
class _Pair:
    head: str
    tail: str
    links: tuple[str, ...]
    exact_shift: bool  # the tail adds an input shift exactly (bias absorption allowed)
    relu: bool  # at least one ReLU on the way (absorption is only useful then)


def _np(v) -> np.ndarray:
    """The variable's values in its own dtype. Products with the float64 scales promote them, so every
    result is as with a float64 copy made first."""
    return to_numpy(v)


class _Ranges:
    """A kernel's channel ranges under the scales applied so far, without rescaling the kernel each step.

    The kernel is reduced once to the max and the sum of |w| over its taps
    for every (input channel, output channel); scaling input channel i by
    a_i and output channel o by b_o scales those entries by a_i * b_o, so
    every range a step needs follows from the reduction and the two scale
    vectors. The kernel itself is scaled once, at the end.
    """

    def __init__(self, type_name: str, kernel: np.ndarray, bias: np.ndarray | None, use_max: bool = True):
        self.depthwise = type_name in DEPTHWISE
        taps = np.abs(kernel).reshape(-1, kernel.shape[-2], kernel.shape[-1])  # (taps, in, out or multiplier)
        # In float64, as of a float64 kernel: a maximum is exact in any float type, and the sum adds float64s.
        # The "max" balance never reads the sums.
        self.max, self.taps = taps.max(0).astype(np.float64), taps.shape[0]
        self.sum = None if use_max else taps.sum(0, dtype=np.float64)
        self.bias = None if bias is None else np.abs(bias).astype(np.float64)
        self.in_scale = np.ones(kernel.shape[-2])
        outs = kernel.shape[-2] * kernel.shape[-1] if self.depthwise else kernel.shape[-1]
        self.out_scale = np.ones(outs)

    def out_ranges(self, use_max: bool):
        """(r(H), max(H)) per output channel, H = |kernel| as (taps, out) plus the bias as one more row."""
        m = self.max * self.in_scale[:, None]
        m = (m.reshape(-1) if self.depthwise else m.max(0)) * self.out_scale  # depthwise: (i, k) sees i alone
        b = None if self.bias is None else self.bias * self.out_scale
        if b is not None:
            m = np.maximum(m, b)
        if use_max:
            return m, m
        s = self.sum * self.in_scale[:, None]
        s, rows = (s.reshape(-1), self.taps) if self.depthwise else (s.sum(0), self.taps * self.max.shape[0])
        s = s * self.out_scale
        if b is not None:
            s, rows = s + b, rows + 1
        return s / rows, m

    def in_ranges(self, use_max: bool):
        """(r(T), max(T)) per input channel, T = |kernel| as (taps, in)."""
        b = self.out_scale.reshape(self.max.shape) if self.depthwise else self.out_scale[None, :]
        m = (self.max * b).max(1) * self.in_scale
        if use_max:
            return m, m
        s = (self.sum * b).sum(1) * self.in_scale
        return s / (self.taps * self.max.shape[1]), m


def _act_kind(node: Node, to_relu6: bool) -> str | None:
    """ "linear", "relu", or None if the node is not a homogeneous link."""
    t, cfg = node.type_name, node.op.get_config()
    if t == "ReLU":
        if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
            return None
        cap = cfg.get("max_value")
        return "relu" if cap is None or (to_relu6 and float(cap) == 6.0) else None
    if t == "Activation":
        act = cfg.get("activation")
        return act if act in ("relu", "linear") or (to_relu6 and act == "relu6") else None
    if t in ("ZeroPadding1D", "ZeroPadding2D"):
        return "linear"
    return None


def _end_ok(node: Node) -> bool:
    return node.type_name in ENDS and node.op.get_config().get("groups", 1) == 1 and not misplaced_bias(node)


def find_pairs(ed: Editor, to_relu6: bool = False) -> list[_Pair]:
    """Every head -> (links) -> tail chain that CLE can rescale."""
    pairs = []
    for node in ed.nodes:
        if not _end_ok(node) or len(ed.calls(node.op)) > 1:
            continue
        head_act = node.op.get_config().get("activation", "linear")
        if head_act not in ("linear", "relu") and not (to_relu6 and head_act == "relu6"):
            continue
        links, relu, padded, cur = [], head_act != "linear", False, node
        axis = channel_axis(node)  # the tail must read its input channels on this axis, every padding pad others
        while True:
            nxt = ed.sole_consumer(cur.name)
            if nxt is None or len(nxt.inputs) != 1:
                break
            if _end_ok(nxt):
                if len(ed.calls(nxt.op)) == 1 and channel_axis(nxt) == axis:
                    cfg = nxt.op.get_config()
                    ks = cfg.get("kernel_size", (1,))
                    exact = nxt.type_name == "Dense" or all(k == 1 for k in ks) or cfg.get("padding") == "valid"
                    pairs.append(_Pair(node.name, nxt.name, tuple(links), exact and not padded, relu))
                break
            kind = _act_kind(nxt, to_relu6)
            if kind is None or (
                kind == "linear" and nxt.type_name.startswith("ZeroPadding") and channel_axis(nxt) != axis
            ):
                break
            relu = relu or kind.startswith("relu")
            padded = padded or nxt.type_name.startswith("ZeroPadding")
            links.append(nxt.name)
            cur = nxt
    return pairs


def cross_layer_equalization(
    graph: Graph, cfg: Mapping, report: OptimizeReport, act_ranges: Mapping[str, np.ndarray] | None = None
) -> Graph:
    """Equalize the per-channel weight ranges of every pair, ``cle_steps`` times; then absorb biases if asked.

    ``act_ranges`` ({head: per-channel max |x| of the tensor its tail reads}, `act_eq.measure`) makes it
    activation-aware, weighted by ``act_eq_beta`` (`qstrat.passes.optimize.act_eq`).
    """
    ed = Editor(graph)
    for node in ed.nodes:
        if node.type_name in ENDS and misplaced_bias(node):
            report.skipped(
                "include_cle",
                node.name,
                f"not equalized: {MISPLACED}",
            )
    pairs = find_pairs(ed, bool(cfg.get("cle_to_relu6", False)))
    if not pairs:
        report.skipped("include_cle", graph.name, "no equalizable pair (conv/depthwise/dense -> ReLU -> conv/...)")
        return graph
    steps = int(cfg.get("cle_steps", 10))
    use_max = cfg.get("cle_balance_method", "max") == "max"
    threshold = float(cfg.get("cle_weight_threshold", 0.1))
    beta = float(cfg.get("act_eq_beta", 0.5))

    weights: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranges: dict[str, _Ranges] = {}
    # In model order (a set's order changes from process to process, and so would the layers' creation).
    for name in dict.fromkeys(n for p in pairs for n in (p.head, p.tail)):
        layer = ed.node(name).op
        w = {"kernel": _np(layer.kernel), "bias": _np(layer.bias) if layer.use_bias else None}
        weights[name] = w
        ranges[name] = _Ranges(ed.node(name).type_name, w["kernel"], w["bias"], use_max)
        if "bn_stats" in ed.node(name).meta:
            stats[name] = tuple(np.asarray(a, np.float64) for a in ed.node(name).meta["bn_stats"])

    total = {p.head: np.ones(1) for p in pairs}
    for _ in range(steps):
        for p in pairs:
            h, t = ranges[p.head], ranges[p.tail]
            rh, hmax = h.out_ranges(use_max)
            rt, tmax = t.in_ranges(use_max)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.sqrt(rt / rh)
            s = np.clip(np.nan_to_num(s, nan=1.0, posinf=10.0), 0.1, 10.0)
            if act_ranges is not None and p.head in act_ranges:  # the ranges under the scales so far
                s_act = activation_factor(act_ranges[p.head] * total[p.head])
                s = np.clip(s ** (1.0 - beta) * s_act**beta, 0.1, 10.0)
            s[hmax + tmax < threshold] = 1.0  # activation-aware too: such channels are left as they are
            h.out_scale = h.out_scale * s
            t.in_scale = t.in_scale * (1.0 / s)
            total[p.head] = total[p.head] * s
            if p.head in stats:
                stats[p.head] = (stats[p.head][0] * s, stats[p.head][1] * s)
    for name, w in weights.items():
        r = ranges[name]
        w["kernel"] = scale_out(ed.node(name).type_name, scale_in(w["kernel"], r.in_scale), r.out_scale)
        if w["bias"] is not None:
            w["bias"] = w["bias"] * r.out_scale

    aware = " (activation-aware)" if act_ranges else ""
    for p in pairs:
        s = total[p.head]
        report.changed(
            "include_cle",
            p.head,
            f"equalized with {p.tail}{aware}: channel scales {float(s.min()):.3g}..{float(s.max()):.3g}",
            partner=p.tail,
        )

    if cfg.get("cle_bias_absorption", False):
        _absorb(ed, pairs, weights, stats, report)

    for name, w in weights.items():
        node = ed.node(name)
        layer = node.op
        has_bias = w["bias"] is not None
        dtype = np.dtype(str(layer.kernel.dtype))
        arrays = [w["kernel"].astype(dtype)] + ([w["bias"].astype(dtype)] if has_bias else [])
        new = built_layer(type(layer), {**layer.get_config(), "use_bias": has_bias}, node.in_tensors[0].shape, arrays)
        meta = dict(node.meta)
        if name in stats:
            meta["bn_stats"] = stats[name]
        # The scale of each output channel, for QAT's fake folding: it moves into the BatchNormalization's gamma.
        meta["cle_out_scale"] = np.asarray(meta.get("cle_out_scale", 1.0)) * ranges[name].out_scale
        ed.replace(name, replace(node, op=new, meta=meta))
    return ed.graph()


def _absorb(ed: Editor, pairs, weights, stats, report: OptimizeReport) -> None:
    for p in pairs:
        if p.head not in stats or not p.relu:
            continue
        if not p.exact_shift:
            report.skipped("cle_bias_absorption", p.head, f"{p.tail} sees zero padding: the shift is not exact")
            continue
        beta, sigma = stats[p.head]
        shift = np.maximum(0.0, beta - 3.0 * sigma)
        if not np.any(shift > 0):
            continue
        h, t = weights[p.head], weights[p.tail]
        if h["bias"] is None:
            continue  # folded heads always have a bias; others carry no statistics
        h["bias"] = h["bias"] - shift
        t_bias = t["bias"] if t["bias"] is not None else 0.0
        t["bias"] = t_bias + shift_through(ed.node(p.tail).type_name, t["kernel"], shift)
        stats[p.head] = (beta - shift, sigma)
        report.changed(
            "cle_bias_absorption",
            p.head,
            f"moved {int((shift > 0).sum())} channel offsets (max {float(shift.max()):.3g}) into {p.tail}",
        )
