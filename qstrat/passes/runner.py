"""Running a probe over batches: one trace, whatever the batch sizes.

``model.predict_on_batch`` traces a new TensorFlow function for each new
input shape until it relaxes the batch dimension: a calibration set whose
last batch is short, or bias correction's segments, cost two or three traces
of a large probe, seconds each. On TensorFlow, `BatchRunner` traces once with
the batch dimension left open. Other backends call ``predict_on_batch``
(torch runs eagerly; JAX compiles per shape).

A probe of a captured graph (`graph_probe`) needs no Keras model on
TensorFlow: the traced function calls the graph's layers on the batch's
tensors directly, so no model is built (a pass over every layer with
symbolic tensors) and no layer is copied. On other backends it is a model
of copies of the layers, as ``predict_on_batch`` needs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np


class BatchRunner:
    """``runner(batch)`` -> the outputs on one batch (a list of NumPy arrays; ``batch``: one array per input).

    Of ``model``, or on TensorFlow of ``fn(*inputs)`` with ``specs`` (shape, dtype) per input.
    ``views=True``: on TensorFlow the arrays are read-only views of the output tensors, not copies
    (large outputs, read once).
    """

    def __init__(self, model=None, fn: Callable | None = None, specs: list[tuple] | None = None, views: bool = False):
        import keras

        self.model = model
        self.views = views
        self._fn = None
        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        if fn is None:
            specs = [(t.shape, t.dtype) for t in model.inputs]

            def fn(*xs):
                return model(nested_inputs(model, list(xs)), training=False)

        signature = [tf.TensorSpec((None, *shape[1:]), dtype) for shape, dtype in specs]
        self._fn = tf.function(fn, input_signature=signature, autograph=False)

    def __call__(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        import keras

        if self._fn is None:
            return keras.tree.flatten(self.model.predict_on_batch(nested_inputs(self.model, list(batch))))
        with lightly_optimized():
            outs = keras.tree.flatten(self._fn(*batch))  # a dict of outputs in the model's order (sorted keys)
        return [np.asarray(o) if self.views else o.numpy() for o in outs]


def nested_inputs(model, flat: list):
    """``flat`` (one value per ``model.inputs``, in that order) as the model takes them: one value, a list, or
    its own dict (keys in any order) or tuple."""
    import keras

    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict | tuple | list):
        return keras.tree.pack_sequence_as(struct, flat)
    return flat[0] if len(flat) == 1 else flat


@contextlib.contextmanager
def lightly_optimized():
    """TensorFlow functions called inside, in this thread, get one rewrite of TensorFlow's graph optimizer
    (grappler): its arithmetic optimizer, once, and none of its other passes.

    A function is optimized when first called with given options, and again for other options: a probe's
    every call must run inside. A probe runs a few dozen batches at most, and taps most of its tensors,
    which keeps the optimizer's fusions from applying: with the whole optimizer, the first call of
    MobileNetV2's probe took 1.26 s against 0.87 s, and later batches ran no faster (`bench/traces.py
    --full-optimizer`). The arithmetic optimizer changes float results (it sums a residual Add of two
    BatchNormalizations as one sum of four terms): kept, it makes the probe's outputs those of the fully
    optimized function, bit for bit, on the `bench/speed.py` models. Without it, fs scales moved, and the
    mini-Xception's agreement on one `bench/ptq.py` split by 4 images of 348. Other threads' options are
    left alone.
    """
    try:
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        before = ctx.function_call_options
        key = (before.executor_type, before.config_proto_serialized)
    except (ImportError, AttributeError):  # TensorFlow's internals moved: optimized as usual
        yield
        return
    if key not in _LIGHT:
        config = config_pb2.ConfigProto()
        config.ParseFromString(before.config_proto_serialized)
        rewrite = config.graph_options.rewrite_options
        rules = rewriter_config_pb2.RewriterConfig
        for field in rewrite.DESCRIPTOR.fields:
            if field.enum_type is not None and field.enum_type.name == "Toggle":
                setattr(rewrite, field.name, rules.ON if field.name == "arithmetic_optimization" else rules.OFF)
        rewrite.memory_optimization = rules.NO_MEM_OPT
        rewrite.meta_optimizer_iterations = rules.ONE
        _LIGHT[key] = context.FunctionCallOptions(executor_type=before.executor_type, config_proto=config)
    ctx.function_call_options = _LIGHT[key]
    try:
        yield
    finally:
        ctx.function_call_options = before


_LIGHT: dict = {}  # per options a thread calls with (executor, config): the same, lightly optimized


def graph_probe(graph, body: Callable[[list, bool], list], name: str, views: bool = False) -> BatchRunner:
    """A runner of ``body(inputs, symbolic)`` -> output tensors, for inputs like ``graph``'s (``views``: see
    `BatchRunner`).

    On TensorFlow ``body`` is traced on the batch's tensors (``symbolic``
    False: it may call the graph's own layers, which a traced call only
    reads). Elsewhere it runs once on Keras inputs (``symbolic`` True: it must
    call copies, see `qstrat.graph.rebuild.copier`, since calling a layer on
    Keras inputs records the call in the layer) to make a model.
    """
    import keras

    from qstrat.graph.rebuild import functional_model, input_tensors

    if keras.backend.backend() == "tensorflow":
        specs = [(tuple(t.shape), t.dtype) for t in (graph.node(r.node).op.output for r in graph.inputs)]
        return BatchRunner(fn=lambda *xs: body(list(xs), False), specs=specs, views=views)
    inputs = input_tensors(graph)
    outputs = body(inputs, True)
    return BatchRunner(functional_model(inputs if len(inputs) > 1 else inputs[0], outputs, name=name))


# A probe runs consecutive batches joined into one where that changes nothing it returns but the time
# (`merged`): on small models each batch's cost is mostly per-op overhead, paid once per call.
MERGE_SAMPLES = 256  # samples in one joined call, at most
MERGE_BYTES = 16 * 2**20  # ... and the largest activation of a joined call, at most (as a float model holds it)


def sample_bytes(graph) -> int:
    """The bytes one sample takes in the largest activation of ``graph`` with a static shape (0 if none)."""
    per_sample = 0
    for node in graph.nodes:
        for t in node.in_tensors:
            shape = getattr(t, "shape", None)
            if shape is None or any(d is None for d in shape[1:]):
                continue
            try:
                size = np.dtype(getattr(t, "dtype", "float32") or "float32").itemsize
            except TypeError:  # a string tensor: no fixed size (its bytes are not what a batch's memory is)
                continue
            per_sample = max(per_sample, size * int(np.prod(shape[1:], dtype=np.int64)))
    return per_sample


def rows_apart(graph) -> bool:
    """True when every operation of ``graph`` computes each sample's row from that sample alone, as Keras' own
    layers do in inference, so batches can run joined. A `Lambda`, a custom layer or a bare ``keras.ops`` call
    may reduce over the batch axis (subtract the batch's mean): its model runs batch by batch, as given."""
    import keras

    for node in graph.nodes:
        module = type(node.op).__module__
        if isinstance(node.op, keras.layers.Lambda) or not module.startswith(("keras.src.layers.", "qstrat.")):
            return False
    return True


def merge_width(batch: int, per_sample: int) -> int:
    """How many batches of ``batch`` samples one call joins: within `MERGE_SAMPLES` and `MERGE_BYTES` (1 on
    JAX, which compiles a probe per input shape, or where the activations' size is unknown)."""
    import keras

    if keras.backend.backend() == "jax" or not per_sample:
        return 1
    return max(1, min(MERGE_SAMPLES // batch, MERGE_BYTES // (batch * per_sample)))


def groups(batches: Iterable[list[np.ndarray]], width: int) -> Iterator[list[list[np.ndarray]]]:
    """The batches in order, ``width`` at a time (the last group may be shorter)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == width:
            yield group
            group = []
    if group:
        yield group


def merged(batches: Iterable[list[np.ndarray]], per_sample: int) -> Iterator[list[list[np.ndarray]]]:
    """The batches in order, in groups to run as one call: batches of the first batch's shapes, `merge_width` of
    them at most (the last group may hold fewer); a batch of other shapes (the short last one, or images of
    another size for a model whose inputs have free dimensions) alone."""
    unit = width = None
    for shapes, run in itertools.groupby(batches, key=lambda batch: tuple(a.shape for a in batch)):
        if unit is None:
            unit, width = shapes, merge_width(shapes[0][0], per_sample)
        yield from groups(run, width if shapes == unit else 1)


def split_outputs(outs: list, kinds: list[str], sizes: list[int]) -> list[list]:
    """Per batch of a joined call (of ``sizes`` samples each), its outputs: ``kinds[k]`` "rows" (one row per
    sample: each batch its rows) or "reduced" (a statistic of all the rows: the first batch gets it, the
    others None)."""
    ends = np.cumsum(sizes)[:-1]
    per_batch: list[list] = [[] for _ in sizes]
    for out, kind in zip(outs, kinds, strict=True):
        parts = np.split(np.asarray(out), ends) if kind == "rows" else [out] + [None] * (len(sizes) - 1)
        for mine, part in zip(per_batch, parts, strict=True):
            mine.append(part)
    return per_batch


def join(unit: list[list[np.ndarray]]) -> list[np.ndarray]:
    """One batch of the batches of ``unit`` (a group `merged` yields), input by input."""
    if len(unit) == 1:
        return unit[0]
    return [np.concatenate([batch[k] for batch in unit]) for k in range(len(unit[0]))]
