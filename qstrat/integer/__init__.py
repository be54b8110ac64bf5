"""An integer reference executor for power-of-2 quantized models.

`simulate_integer(qmodel, x)` runs a model quantized with power-of-2
quantizers (``pof2s``, TQT) using only integer arithmetic: int64 arrays,
shifts and the quantizers' rounding, as the DPU computes. Its outputs and
every FakeQuant tensor equal the fake-quant Keras model's, bit for bit,
wherever the Keras model's float32 arithmetic is exact.

Example:
    >>> from qstrat.integer import run_integer, simulate_integer
    >>> y = simulate_integer(qmodel, images)
    >>> run = run_integer(qmodel, images)
    >>> run.tensors["relu1_output_q"]     # (int64 grid integers, position)
"""

from qstrat.integer.executor import IntegerRun, run_integer, simulate_integer
from qstrat.integer.tensors import IntTensor, requantize, round_ratio

__all__ = ["IntTensor", "IntegerRun", "requantize", "round_ratio", "run_integer", "simulate_integer"]
