"""Running a probe model over batches: one trace, whatever the batch sizes.

``model.predict_on_batch`` traces a new TensorFlow function for each new
input shape until it relaxes the batch dimension: a calibration set whose
last batch is short, or bias correction's segments, cost two or three traces
of a large probe, seconds each. On TensorFlow, `BatchRunner` traces the model
once with the batch dimension left open. Other backends call
``predict_on_batch`` (torch runs eagerly; JAX compiles per shape).
"""

from __future__ import annotations

import numpy as np


class BatchRunner:
    """``runner(batch)`` -> the model's outputs on one batch (a list of NumPy arrays, one per input)."""

    def __init__(self, model):
        import keras

        self.model = model
        self._fn = None
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            specs = [tf.TensorSpec((None, *t.shape[1:]), t.dtype) for t in model.inputs]
            single = len(specs) == 1

            def run(*xs):
                return model(xs[0] if single else list(xs), training=False)

            self._fn = tf.function(run, input_signature=specs, autograph=False)

    def __call__(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        if self._fn is None:
            outs = self.model.predict_on_batch(list(batch))
            return list(outs) if isinstance(outs, (list, tuple)) else [outs]
        outs = self._fn(*batch)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return [o.numpy() for o in outs]
