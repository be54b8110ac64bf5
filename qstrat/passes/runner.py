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

from collections.abc import Callable

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
            single = len(specs) == 1

            def fn(*xs):
                return model(xs[0] if single else list(xs), training=False)

        signature = [tf.TensorSpec((None, *shape[1:]), dtype) for shape, dtype in specs]
        self._fn = tf.function(fn, input_signature=signature, autograph=False)

    def __call__(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        if self._fn is None:
            outs = self.model.predict_on_batch(list(batch))
            return list(outs) if isinstance(outs, (list, tuple)) else [outs]
        outs = self._fn(*batch)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return [np.asarray(o) if self.views else o.numpy() for o in outs]


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
