"""Calibration and QAT under Keras' own distribution engines, against one device.

Each case runs `distributed_check.py` in a child process: the devices must be
made before the backend starts (JAX: ``XLA_FLAGS=--xla_force_host_platform_device_count=4``;
TensorFlow: two logical CPU devices), and this process's backend has started.
The model is quantized with pof2s and with fs on one device and under the
distribution; every quantizer state (positions, scales, zero points) and every
bias correction must be equal, bit for bit. 100 samples in batches of 8 make 12
full batches and a short one. On TensorFlow, both runs join each two batches
into one call (`qstrat.passes.runner.merged`, its limit set in the check): six
units of two, spread over the 2 devices in 3 groups; on JAX, the 12 batches
spread over the 4 devices in 3 groups. The groups spread are counted; the short
remainder runs alone.

QAT: the digits CNN trained for 16 steps with tqt and with pof2s on one
device and under the distribution; see `check_qat` for what must agree. An
MAFS quantizer on a model's input sees only the data, so its moving range
must be equal bit for bit.

A ModelParallel layout (JAX, 2x2 mesh): the quantized model's kernels keep it.
"""

import json
import os
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_check.py")


def run(backend: str, model: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    done = subprocess.run(
        [sys.executable, CHECK, backend, model], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def check(report: dict, groups: int) -> None:
    assert [r["strategy"] for r in report["runs"]] == ["pof2s", "fs"]
    for r in report["runs"]:
        assert r["groups"] == groups, r  # the full units, in groups as wide as the devices, each group spread
        assert r["corrections"] > 0 and r["states"] > r["corrections"], r
        assert r["differ"] == [], r


@pytest.mark.parametrize("model", ["digits", "xception"])
def test_mirrored_strategy_on_two_devices_calibrates_bit_for_bit(model):
    check(run("tensorflow", model), groups=3)


# On JAX the digits CNN alone: the mini-Xception's layers (separable convolutions, Adds) are spread the same
# way, and it runs under the MirroredStrategy above; on four JAX devices it took about two minutes of CI.
@pytest.mark.jax_devices
@pytest.mark.parametrize("model", ["digits"])
def test_data_parallel_on_four_jax_devices_calibrates_bit_for_bit(model):
    check(run("jax", model), groups=3)


# QAT: Adam moves a parameter by at most lr (1 - beta1) / sqrt(1 - beta2) = 3.17 lr a step, so two runs that
# differ only in the order the replicas' gradients are added stay within twice that per step of each other.
ADAM_STEP = (1 - 0.9) / (1 - 0.999) ** 0.5


def check_qat(report: dict, strategies: list[str]) -> None:
    bound = 2 * ADAM_STEP * report["lr"] * report["steps"]
    assert [r["strategy"] for r in report["runs"]] == strategies
    for r in report["runs"]:
        assert min(r["accuracy"]) >= 0.95, r  # both trained (the float digits CNN: 98%)
        assert r["weight_max_diff"] <= bound and r["state_max_diff"] <= bound, r
        # Positions are the whole batch's on every device: equal, where the weights barely differ.
        assert not [k for k in r["state_differ"] if k.endswith(".pos")], r
    assert report["mafs"]["differ"] == [], report["mafs"]
    assert report["mafs"]["state"]["steps"] == report["steps"]


def test_qat_under_mirrored_strategy_matches_one_device():
    check_qat(run("tensorflow", "qat"), ["tqt", "pof2s"])


@pytest.mark.jax_devices
def test_qat_under_data_parallel_matches_one_device():
    check_qat(run("jax", "qat"), ["tqt", "pof2s"])


@pytest.mark.jax_devices
def test_a_model_parallel_layout_calibrates_and_the_quantized_model_keeps_it():
    report = run("jax", "layout")
    assert report["quantized"] == report["float"]  # every kernel sharded as the layout map says
    assert sum("'model'" in spec for spec in report["quantized"].values()) == 4  # pw1-3 and the head
    assert report["groups"] == 6  # a batch axis of 2: 12 full batches in 6 spread groups
    assert report["outputs"] == [32, 10]
    # Split kernels reorder sums in the last bits: bias corrections may move there, positions may not.
    assert all(k.endswith(".correction") for k in report["differ"]), report["differ"]
