"""Calibration of the weights: each weight quantizer's state from the values it quantizes.

A weight is known before any data runs, so its quantizer is set from the whole tensor at once; targets that
share one state (``shared_quantizer``) are set from all their tensors together (`joint_tensor`).
"""

from __future__ import annotations

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError
from qstrat.layers import QuantizeWrapper
from qstrat.quantizers.registry import checked_state


def assign_state(state: dict, values, quantizer, method: str, where: str) -> None:
    """Set ``state`` to what ``quantizer.<method>`` returned (`checked_state`: None leaves it as it is)."""
    for key, value in (checked_state(quantizer, values, state, method, where) or {}).items():
        state[key].assign(value)


def weight_groups(qmodel) -> list[list[tuple[QuantizeWrapper, str]]]:
    """The weight and bias targets, grouped by the state they use: one target each, or all that share one."""
    groups: dict[int, list] = {}
    for layer in qmodel.layers:
        if isinstance(layer, QuantizeWrapper):
            for attr in layer.quantizers:
                shared = layer.shared_states.get(attr)
                groups.setdefault(id(shared) if shared is not None else id(layer.state[attr]), []).append((layer, attr))
    return list(groups.values())


def joint_tensor(tensors: list[np.ndarray], axis: int | None, where: str = "shared_quantizer") -> np.ndarray:
    """One tensor holding the values of all ``tensors``, for a state they share.

    Per tensor (``axis`` None): all values in one vector. Per channel: each
    tensor's channels side by side on ``axis``, so channel c of the result
    holds channel c of every tensor.
    """
    if len(tensors) == 1:
        return tensors[0]
    if axis is None:
        return np.concatenate([np.ravel(t) for t in tensors])
    counts = {t.shape[axis] for t in tensors}
    if len(counts) > 1:
        raise ConfigError(
            where,
            f"a shared per-channel quantizer needs targets with one channel count, got {sorted(counts)}",
            "Share a per-tensor quantizer instead, or stop sharing.",
        )
    rows = np.concatenate([np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) for t in tensors])
    ndim = max(2, axis + 1 if axis >= 0 else -axis)
    rows = rows.reshape(rows.shape + (1,) * (ndim - 2))
    return np.moveaxis(rows, 1, axis % ndim)


def _weight_value(wrapper: QuantizeWrapper, attr: str) -> np.ndarray:
    """What the quantizer of ``attr`` quantizes: the weight, or the layer's ``target_value`` (a folded kernel)."""
    target = getattr(wrapper.layer, "target_value", None)
    if target is None:
        return to_numpy(getattr(wrapper.layer, attr))

    return to_numpy(target(attr))


def calibrate_weight_group(group: list[tuple[QuantizeWrapper, str]]) -> None:
    """Set the state of one group of `weight_groups` from the weights it quantizes (all of them when shared)."""
    wrapper, attr = group[0]
    q = wrapper.quantizers[attr]
    tensors = [_weight_value(w, a) for w, a in group]
    where = f"{wrapper.layer.name}.{attr}"
    assign_state(
        wrapper.state[attr], q.state_from_tensor(joint_tensor(tensors, q.axis, where)), q, "state_from_tensor", where
    )


def calibrate_weights(qmodel) -> None:
    """Set the state of every weight quantizer from the weight it quantizes (the weights, when shared)."""
    for group in weight_groups(qmodel):
        calibrate_weight_group(group)
