"""Adaptive rounding of one block's weights (AdaRound, Nagel et al. 2020): what fast finetune trains.

Rounding each weight to its nearest grid value is not what minimizes a
layer's output error: a weight's rounding error adds to its neighbours'
in every output. While a block trains, each quantized weight tensor W of
its layer is replaced by a soft choice between the two grid values around
it, ``((floor(W / s) + zp + h(V)).clip(qmin, qmax) - zp) * s`` with
``h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1)``, and V (one logit per weight,
starting where h(V) is W's fractional position, so the start is W itself)
is trained by Adam on the block's output error plus a regularizer
``mean(1 - |2 h(V) - 1|^beta)`` that pushes every h to 0 or 1, with beta
annealed from 20 to 2 after a warm-up with no regularizer. At the end
each weight takes the grid value h(V) chose (V >= 0: up), exactly, so
the layer's own quantizer, whose grid stays frozen, maps it to itself.

The bias moves too, continuously, in steps of its own grid, through its
quantizer (clipped straight-through estimator). Every other quantizer runs
as in inference, with its state frozen.

Each weight can only move to one of its two neighbours, so the layer never
strays far from the calibrated one, whatever the learning rate.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from qstrat.arrays import to_numpy
from qstrat.quantizers.affine import affine_of
from qstrat.quantizers.reference import expand

ZETA, GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid
WARMUP = 0.2  # the fraction of the epochs without the rounding regularizer
BETA = (20.0, 2.0)  # the regularizer's exponent, annealed from the first to the second
REG = 0.01  # the regularizer's weight, against the output error summed over a sample's elements (as in the paper)


def _np(v) -> np.ndarray:
    return to_numpy(v)


def batch_mse(model, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> float:
    """The mean squared error of ``model(x)`` against ``y``, batch by batch (no array of all its outputs)."""
    total = 0.0
    for at in range(0, len(x), batch_size):
        got = np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(x[at : at + batch_size])), np.float64)
        total += float(np.sum(np.square(got - y[at : at + batch_size].astype(np.float64))))
    return total / y.size


class SoftRounding:
    """Stands in for one weight quantizer of a wrapper while its block trains (see the module)."""

    def __init__(self, quantizer, state, weight: np.ndarray, logits, hard, where: str):
        scale, zp, _ = affine_of(quantizer, {k: _np(v) for k, v in state.items()}, where)
        w = weight.astype(np.float64)
        self.scale = expand(scale, w.ndim, quantizer.axis).astype(np.float64)
        self.zp = expand(zp, w.ndim, quantizer.axis).astype(np.float64)
        units = w / self.scale
        self.base = (np.floor(units) + self.zp).astype(np.float32)
        rest = np.clip(units - np.floor(units), 0.0, 1.0)
        p = (rest - GAMMA) / (ZETA - GAMMA)  # in (0.083, 0.917): a finite logit
        self.start = np.log(p / (1.0 - p)).astype(np.float32)
        self.qmin, self.qmax = float(quantizer.grid.qmin), float(quantizer.grid.qmax)
        self.logits, self.hard = logits, hard

    def soft(self, logits):
        return ops.clip(ops.sigmoid(logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def __call__(self, w, state, training=False):
        v = ops.convert_to_tensor(self.logits)
        h = ops.where(ops.convert_to_tensor(self.hard) > 0.5, ops.cast(v >= 0, "float32"), self.soft(v))
        n = ops.clip(ops.add(ops.convert_to_tensor(self.base), h), self.qmin, self.qmax)
        zp, scale = (ops.convert_to_tensor(a.astype(np.float32)) for a in (self.zp, self.scale))
        return ops.cast(ops.multiply(ops.subtract(n, zp), scale), w.dtype)

    def regularizer(self, beta):
        return ops.sum(1.0 - ops.power(ops.abs(2.0 * self.soft(ops.convert_to_tensor(self.logits)) - 1.0), beta))

    def weight(self) -> np.ndarray:
        """The grid values the logits chose, exactly (float64 arithmetic on integers and a float32 scale)."""
        n = np.clip(self.base.astype(np.float64) + (_np(self.logits) >= 0), self.qmin, self.qmax)
        return ((n - self.zp) * self.scale).astype(np.float32)


class SoftBias:
    """Stands in for a bias quantizer while its block trains: the bias moved by ``step * shift``, then quantized."""

    def __init__(self, quantizer, state, bias: np.ndarray, shift, where: str):
        scale, _, _ = affine_of(quantizer, {k: _np(v) for k, v in state.items()}, where)
        self.quantizer, self.state = quantizer, state
        self.bias = bias.astype(np.float32)
        self.step = np.broadcast_to(scale, bias.shape).astype(np.float32)
        self.shift = shift

    def __call__(self, w, state, training=False):
        shift = ops.multiply(ops.convert_to_tensor(self.step), ops.convert_to_tensor(self.shift))
        moved = ops.add(ops.convert_to_tensor(self.bias), shift)
        return self.quantizer(ops.cast(moved, w.dtype), self.state, training=False)

    def value(self) -> np.ndarray:
        return (self.bias + self.step * _np(self.shift)).astype(np.float32)


class Chain(keras.Model):
    """A block's layers called in order, every quantizer as in inference (frozen state)."""

    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        self.chain = list(layers)

    def call(self, x, training=None):
        for layer in self.chain:
            x = layer(x, training=False)
        return x


class Trainer(Chain):
    """A block's layers, its weight quantizers swapped for `SoftRounding` (and `SoftBias`), as one model to fit.

    ``swap()`` puts the stand-ins in; ``restore(keep)`` puts the quantizers back and, with ``keep``,
    writes the chosen weights and the moved bias into the layer.
    """

    def __init__(self, layers, wrapper, attrs, **kwargs):
        super().__init__(layers, **kwargs)
        self.wrapper = wrapper
        self.beta = self.add_weight(name="beta", shape=(), initializer="zeros", trainable=False)
        self.reg = self.add_weight(name="reg", shape=(), initializer="zeros", trainable=False)
        self.hard = self.add_weight(name="hard", shape=(), initializer="zeros", trainable=False)
        self.roundings, self.bias = {}, None
        for attr in attrs:
            weight = _np(getattr(wrapper.layer, attr))
            logits = self.add_weight(name=f"{attr}_logits", shape=weight.shape, initializer="zeros", trainable=True)
            where = f"{wrapper.layer.name}.{attr}"
            r = SoftRounding(wrapper.quantizers[attr], wrapper.state[attr], weight, logits, self.hard, where)
            logits.assign(r.start)
            self.roundings[attr] = r
        if "bias" in wrapper.quantizers and getattr(wrapper.layer, "bias", None) is not None:
            shift = self.add_weight(name="bias_shift", shape=wrapper.layer.bias.shape, initializer="zeros")
            where = f"{wrapper.layer.name}.bias"
            self.bias = SoftBias(
                wrapper.quantizers["bias"], wrapper.state["bias"], _np(wrapper.layer.bias), shift, where
            )
        self._saved = dict(wrapper.quantizers)

    def swap(self) -> None:
        self.wrapper.quantizers.update(self.roundings)
        if self.bias is not None:
            self.wrapper.quantizers["bias"] = self.bias

    def restore(self, keep: bool) -> None:
        self.wrapper.quantizers.update(self._saved)
        if not keep:
            return
        for attr, r in self.roundings.items():
            getattr(self.wrapper.layer, attr).assign(r.weight())
        if self.bias is not None:
            self.wrapper.layer.bias.assign(self.bias.value())

    def rounding_variables(self) -> list:
        """What it trains: the rounding logits and the bias shift."""
        out = [r.logits for r in self.roundings.values()]
        return out + ([self.bias.shift] if self.bias is not None else [])

    def hard_error(self, x, y) -> float:
        """The block's output error on (x, y) with the weights each logit chooses now (the grid values)."""
        self.hard.assign(1.0)
        try:
            return batch_mse(self, x, y)
        finally:
            self.hard.assign(0.0)

    def schedule(self, epoch: int, epochs: int) -> bool:
        """Set the regularizer's weight and exponent for ``epoch`` (of ``epochs``); True in the warm-up."""
        warm = math.ceil(WARMUP * epochs)
        if epoch < warm:
            self.reg.assign(0.0)
            self.beta.assign(BETA[0])
            return True
        t = (epoch - warm) / max(1, epochs - warm - 1)
        self.reg.assign(REG)
        self.beta.assign(BETA[0] + (BETA[1] - BETA[0]) * min(1.0, t))
        return False

    @property
    def losses(self):
        """None: the block's error and the rounding regularizer are the whole objective (a layer's weight
        regularizer would pull it away)."""
        return []

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        squares = ops.square(ops.cast(y_pred, "float32") - ops.cast(y, "float32"))
        error = ops.mean(ops.sum(ops.reshape(squares, (ops.shape(squares)[0], -1)), axis=1))
        beta = ops.convert_to_tensor(self.beta)
        reg = sum(r.regularizer(beta) for r in self.roundings.values())
        return error + ops.convert_to_tensor(self.reg) * reg
