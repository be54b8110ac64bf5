"""Float-equivalent clean-ups: training-only layers, dead branches, fused activations,
SeparableConv2D, keras.ops operations, and the (not equivalent, opt-in) ReLU6 -> ReLU.

Each pass is ``pass(graph, config, report) -> graph`` and never changes its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from qstrat.arrays import to_numpy
from qstrat.graph.ir import KERNEL_LAYERS, Graph, Node, TensorRef
from qstrat.graph.rewrite import Editor, built_layer, new_node
from qstrat.passes.optimize.report import OptimizeReport

TRAINING_ONLY = (
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
    "ActivityRegularization",
)


def origin_of(node: Node) -> str:
    """The user's layer a node comes from (itself unless a pass made it from another)."""
    return node.meta.get("origin") or node.layer_name


OTHER_FLOATS = ("float16", "bfloat16", "float64")


def compute_in_float32(graph: Graph, report: OptimizeReport) -> Graph:
    """Every layer that computes or keeps its weights in another float type (a ``mixed_float16`` model, a
    float64 layer) as a float32 copy: qstrat simulates integer hardware in float32, the type its quantizers,
    its integer reference and its exports are made to agree in (float16 holds neither a bias's fine grid nor
    a layer's sums). Not a strategy key: the optimize stage always runs it first.
    """
    import keras

    from qstrat.graph.rebuild import built_copy

    ed = Editor(graph)
    done: dict[int, object] = {}
    for node in ed.walk():
        op = node.op
        policy = getattr(op, "dtype_policy", None)
        if not isinstance(op, keras.layers.Layer) or type(op).__name__ == "InputLayer" or policy is None:
            continue
        if not {policy.compute_dtype, policy.variable_dtype} & set(OTHER_FLOATS):
            continue
        if id(op) not in done:
            done[id(op)] = (
                built_copy(op, "float32")
                if op.built
                else op.__class__.from_config({**op.get_config(), "dtype": "float32"})
            )
        ed.replace(node.name, replace(node, op=done[id(op)], meta=dict(node.meta)))
        report.changed("compute_in_float32", node.name, f"computes in float32 (dtype policy {policy.name})")
    return ed.graph()


def remove_dropout(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """Drop Dropout, GaussianNoise and the other layers that only act in training."""
    ed = Editor(graph)
    for node in ed.walk():
        if node.type_name in TRAINING_ONLY and len(node.inputs) == 1:
            ed.bypass(node.name)
            report.changed("remove_dropout", node.name, f"removed {node.type_name} (identity at inference)")
    return ed.graph()


def remove_unused_layers(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """Drop nodes that no model output depends on (model inputs stay)."""
    live = {r.node for r in graph.outputs}
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(r.node for r in node.inputs)
    ed = Editor(graph)
    for node in ed.walk():
        if node.name not in live and node.inputs:
            ed.remove(node.name)
            report.changed("remove_unused_layers", node.name, "removed: feeds no model output")
    return ed.graph()


def _activation_name(act) -> str:
    if isinstance(act, str):
        return act
    if isinstance(act, Mapping):  # a serialized object; a plain function's config is its name
        cfg = act.get("config")
        name = cfg if isinstance(cfg, str) else cfg.get("name") if isinstance(cfg, Mapping) else None
        return str(name or act.get("class_name") or "activation").split(">")[-1]  # "package>name": the name
    return getattr(act, "__name__", "activation")


def _with_config(node: Node, shapes_from: Node, **changes):
    """A copy of ``node.op`` with config ``changes``, holding the same weights."""
    layer = node.op
    cfg = {**layer.get_config(), **changes}
    weights = layer.get_weights() if layer.weights else None
    return built_layer(type(layer), cfg, shapes_from.in_tensors[0].shape, weights)


def separate_conv_act(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """Conv/Dense(activation=f) -> Conv/Dense(linear) + Activation(f) named ``<layer>_<f>``."""
    ed = Editor(graph)
    linear: dict[int, object] = {}
    for node in ed.walk():
        if node.type_name not in KERNEL_LAYERS:
            continue
        act = node.op.get_config().get("activation", "linear")
        if act in ("linear", None):
            continue
        if id(node.op) not in linear:
            linear[id(node.op)] = _with_config(node, node, activation="linear", activity_regularizer=None)
        ed.replace(node.name, replace(node, op=linear[id(node.op)], meta=dict(node.meta)))
        import keras

        act_name = ed.unique(f"{node.layer_name}_{_activation_name(act)}")
        # The layer's own activation (a serialized one, a custom function's, may not deserialize here).
        act_layer = keras.layers.Activation(act if isinstance(act, str) else node.op.activation, name=act_name)
        act_layer.activity_regularizer = node.op.activity_regularizer  # it regularizes the activation's output
        ed.redirect(TensorRef(node.name, 0), TensorRef(act_name, 0))
        out_shape = linear[id(node.op)].compute_output_shape(node.in_tensors[0].shape)
        meta = {"origin": origin_of(node)}
        ed.insert_after(node.name, new_node(act_name, act_layer, [TensorRef(node.name, 0)], [out_shape], meta=meta))
        report.changed("separate_conv_act", node.name, f"activation '{_activation_name(act)}' moved to {act_name}")
    return ed.graph()


def separable_conv(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """SeparableConv2D -> DepthwiseConv2D (no bias) + 1x1 Conv2D (bias and activation of the original)."""
    import keras

    ed = Editor(graph)
    split: dict[int, tuple] = {}
    for node in ed.walk():
        if node.type_name != "SeparableConv2D":
            continue
        sep = node.op
        c = sep.get_config()
        shape = node.in_tensors[0].shape
        if id(sep) not in split:
            dw_name, pw_name = ed.unique(f"{sep.name}_depthwise"), ed.unique(f"{sep.name}_pointwise")
            dw_cfg = {
                "name": dw_name,
                "kernel_size": c["kernel_size"],
                "strides": c["strides"],
                "padding": c["padding"],
                "depth_multiplier": c["depth_multiplier"],
                "data_format": c["data_format"],
                "dilation_rate": c["dilation_rate"],
                "use_bias": False,
                "depthwise_regularizer": c.get("depthwise_regularizer"),
                "depthwise_constraint": c.get("depthwise_constraint"),
                "dtype": c.get("dtype"),
            }
            dw = built_layer(keras.layers.DepthwiseConv2D, dw_cfg, shape, [_np(sep.depthwise_kernel)])
            pw_cfg = {
                "name": pw_name,
                "filters": c["filters"],
                "kernel_size": 1,
                "data_format": c["data_format"],
                "activation": c["activation"],
                "use_bias": c["use_bias"],
                # What trains the separable conv's weights and output trains its halves' (QAT).
                "kernel_regularizer": c.get("pointwise_regularizer"),
                "kernel_constraint": c.get("pointwise_constraint"),
                "bias_regularizer": c.get("bias_regularizer"),
                "bias_constraint": c.get("bias_constraint"),
                "activity_regularizer": c.get("activity_regularizer"),
                "dtype": c.get("dtype"),
            }
            pw_weights = [_np(sep.pointwise_kernel)] + ([_np(sep.bias)] if c["use_bias"] else [])
            pw = built_layer(keras.layers.Conv2D, pw_cfg, dw.compute_output_shape(shape), pw_weights)
            split[id(sep)] = (dw, pw)
        dw, pw = split[id(sep)]
        taken = {n.name for n in ed.nodes}
        first = node.name == sep.name and dw.name not in taken and pw.name not in taken
        dw_node = dw.name if first else ed.unique(f"{node.name.replace('@', '_')}_depthwise")
        pw_node = pw.name if first else ed.unique(f"{node.name.replace('@', '_')}_pointwise")
        meta = {**node.meta, "origin": origin_of(node)}
        ed.replace(node.name, replace(node, name=dw_node, op=dw, meta=meta))
        pw_in = [dw.compute_output_shape(shape)]
        ed.insert_after(
            dw_node, new_node(pw_node, pw, [TensorRef(dw_node, 0)], pw_in, meta={"origin": origin_of(node)})
        )
        ed.redirect(TensorRef(dw_node, 0), TensorRef(pw_node, 0), skip={pw_node})
        report.changed("separable_conv", node.name, f"split into {dw_node} + {pw_node}")
    return ed.graph()


def _np(v):
    return to_numpy(v)


def convert_relu6_to_relu(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """ReLU(max_value=6), Activation('relu6') and activation='relu6' become plain ReLU (outputs above 6 change)."""
    import keras

    ed = Editor(graph)
    done: dict[int, object] = {}
    for node in ed.walk():
        op, new = node.op, None
        if node.type_name == "ReLU" and op.max_value is not None and float(op.max_value) == 6.0:
            new = done.get(id(op)) or keras.layers.ReLU.from_config({**op.get_config(), "max_value": None})
        elif node.type_name == "Activation" and op.get_config().get("activation") == "relu6":
            new = done.get(id(op)) or keras.layers.Activation.from_config({**op.get_config(), "activation": "relu"})
        elif node.type_name in KERNEL_LAYERS and op.get_config().get("activation") == "relu6":
            new = done.get(id(op)) or _with_config(node, node, activation="relu")
        if new is not None:
            done[id(op)] = new
            ed.replace(node.name, replace(node, op=new, meta=dict(node.meta)))
            report.changed("convert_relu6_to_relu", node.name, "ReLU6 -> ReLU")
    return ed.graph()


# ---- keras.ops -> layers --------------------------------------------------------------------------


def _tensor_args_only(node: Node) -> bool:
    """True when every argument of the recorded call is one of the node's input tensors."""
    import keras

    args = node.arguments
    if args is None:
        return False
    flat = list(args.args) + list(args.kwargs.values())
    items = []
    for a in flat:
        items.extend(a if isinstance(a, (list, tuple)) else [a])
    return all(isinstance(a, keras.KerasTensor) for a in items if a is not None)


def _shapes(node: Node):
    return [tuple(t.shape) for t in node.in_tensors]


def _layer_for_op(node: Node):
    """(keras layer class, config) equivalent to a keras.ops node, or (None, reason)."""
    import keras

    L = keras.layers
    t, op = node.type_name, node.op
    module = type(op).__module__
    if not module.startswith("keras.src.ops"):
        return None, None
    shapes = _shapes(node)
    rank = len(shapes[0]) if shapes else 0
    if t in ("Add", "Subtract", "Multiply"):
        if len(node.inputs) != 2 or not _tensor_args_only(node):
            return None, "has a constant operand (a layer needs two tensors)"
        if shapes[0] != shapes[1]:
            return None, f"broadcasts {shapes[0]} with {shapes[1]} (merge layers need equal shapes)"
        return getattr(L, t), {}
    if t == "Concatenate":
        if not _tensor_args_only(node):
            return None, "has a constant operand"
        if len(node.inputs) < 2:
            return None, "concatenates a single tensor (a Concatenate layer needs two or more)"
        return L.Concatenate, {"axis": op.axis}
    if t in ("Relu", "Relu6", "Sigmoid"):
        if not _tensor_args_only(node):
            return None, "has extra arguments"
        if t == "Relu":
            return L.ReLU, {}
        if t == "Relu6":
            return L.ReLU, {"max_value": 6.0}
        return L.Activation, {"activation": "sigmoid"}
    if t == "Mean":
        axis = op.axis if isinstance(op.axis, (list, tuple)) else (op.axis,)
        axis = tuple(sorted(a % rank for a in axis)) if op.axis is not None else ()
        if rank == 4 and axis == (1, 2):
            return L.GlobalAveragePooling2D, {"keepdims": bool(op.keepdims), "data_format": "channels_last"}
        if rank == 3 and axis == (1,):
            return L.GlobalAveragePooling1D, {"keepdims": bool(op.keepdims), "data_format": "channels_last"}
        return None, f"mean over axes {op.axis} is not a spatial mean"
    if t == "Reshape":
        new = tuple(op.newshape)
        inner = shapes[0][1:]
        known = all(d is not None for d in inner) and all(d is not None and d > 0 for d in new[1:])
        if new and new[0] == -1 and known and int(_prod(inner)) == int(_prod(new[1:])):
            return L.Reshape, {"target_shape": new[1:]}
        return None, f"reshape to {new} may move the batch axis"
    if t == "Transpose":
        axes = tuple(op.axes) if op.axes is not None else None
        if axes and axes[0] == 0:
            return L.Permute, {"dims": axes[1:]}
        return None, f"transpose {axes} moves the batch axis"
    if t == "Pad":
        pads = tuple(tuple(p) for p in op.pad_width) if op.pad_width is not None else ()
        cv = node.arguments.kwargs.get("constant_values") if node.arguments else None
        if op.mode != "constant" or cv not in (None, 0, 0.0) or len(pads) != rank:
            return None, "only zero padding has a layer"
        if rank == 4 and pads[0] == (0, 0) and pads[3] == (0, 0):
            return L.ZeroPadding2D, {"padding": (pads[1], pads[2]), "data_format": "channels_last"}
        if rank == 3 and pads[0] == (0, 0) and pads[2] == (0, 0):
            return L.ZeroPadding1D, {"padding": pads[1], "data_format": "channels_last"}
        return None, "pads the batch or channel axis"
    return None, f"no Keras layer does keras.ops '{t}'"


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def convert_tf_op_to_keras(graph: Graph, cfg: Mapping, report: OptimizeReport) -> Graph:
    """keras.ops operations in the graph become the equivalent Keras layers, where one exists."""
    ed = Editor(graph)
    for node in ed.walk():
        cls, conf = _layer_for_op(node)
        if cls is None:
            if conf is not None:
                report.skipped("convert_tf_op_to_keras", node.name, conf)
            continue
        name = node.name if "@" not in node.name else ed.unique(node.name.replace("@", "_"))
        layer = cls.from_config({**conf, "name": name})
        ed.replace(
            node.name,
            Node(layer.name, layer, node.inputs, None, node.in_tensors, node.num_outputs, dict(node.meta)),
        )
        report.changed("convert_tf_op_to_keras", node.name, f"keras.ops {node.type_name} -> {cls.__name__}")
    return ed.graph()
