"""BatchRunner: the same outputs as predict_on_batch, for any batch size, with one trace on TensorFlow."""

import keras
import numpy as np
import pytest

from qstrat.passes.runner import BatchRunner


def _model():
    a, b = keras.Input((6, 6, 2), name="a"), keras.Input((3,), name="b")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(a))
    y = keras.layers.Concatenate()([x, keras.layers.Dense(4)(b)])
    return keras.Model([a, b], [keras.layers.Dense(2)(y), x])


@pytest.mark.portable
def test_outputs_equal_predict_on_batch_for_every_batch_size():
    model = _model()
    runner = BatchRunner(model)
    rng = np.random.default_rng(0)
    for n in (5, 32, 1, 17):
        batch = [rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")]
        got = runner(batch)
        want = model.predict_on_batch(batch)
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, np.asarray(w))


def test_tensorflow_traces_once_whatever_the_batch_sizes():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tracing is TensorFlow's")
    runner = BatchRunner(_model())
    rng = np.random.default_rng(0)
    for n in (32, 7, 1, 32, 12):
        runner([rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")])
    assert runner._fn.experimental_get_tracing_count() == 1


def _batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=(n, 2)).astype("float32")] for n in sizes]


@pytest.mark.portable
@pytest.mark.parametrize(
    "sizes, width, groups",
    [
        ([32] * 9 + [8], 4, [4, 4, 1, 1]),  # the short last batch alone
        ([32] * 8, 8, [8]),
        ([32, 32, 16, 32], 2, [2, 1, 1]),  # a batch of another size alone; those after it too (their own group)
        ([5], 8, [1]),
    ],
)
def test_merged_joins_batches_of_the_first_size_up_to_the_width(sizes, width, groups, monkeypatch):
    from qstrat.passes import runner

    monkeypatch.setattr(runner, "merge_width", lambda batch, per_sample: width)
    batches = _batches(sizes)
    got = list(runner.merged(iter(batches), 1))
    assert [len(g) for g in got] == groups
    assert [b for g in got for b in g] == batches  # every batch once, in order


@pytest.mark.portable
def test_merge_width_keeps_to_the_sample_and_byte_budgets():
    from qstrat.passes.runner import MERGE_BYTES, MERGE_SAMPLES, merge_width

    if keras.backend.backend() == "jax":
        assert merge_width(32, 100) == 1  # JAX compiles per input shape: no joined calls
        return
    assert merge_width(32, 100) == MERGE_SAMPLES // 32  # tiny samples: the sample budget
    assert merge_width(32, MERGE_BYTES // 64) == 2  # 32 samples of MERGE_BYTES / 64: two batches fit
    assert merge_width(32, MERGE_BYTES // 63) == 1
    assert merge_width(32, 10 * MERGE_BYTES) == 1  # never under one batch
    assert merge_width(32, 0) == 1  # unknown sizes: one batch at a time
    assert merge_width(MERGE_SAMPLES * 2, 1) == 1


@pytest.mark.portable
def test_a_joined_call_gives_each_batch_its_rows_and_the_first_the_reduction():
    i = keras.Input((2,))
    rows = keras.layers.Dense(3, name="rows")(i)
    model = keras.Model(i, [rows, keras.layers.Lambda(lambda t: keras.ops.max(t, axis=0), name="reduced")(i)])
    from qstrat.passes.runner import join, split_outputs

    runner = BatchRunner(model)
    group = _batches([4, 4, 3], seed=1)
    got = split_outputs(runner(join(group)), ["rows", "reduced"], [4, 4, 3])
    assert len(got) == 3
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("rows").weights)
    for batch, (r, _) in zip(group, got, strict=True):
        # The same rows, from a call of another shape: kernels may sum x0*w0 + x1*w1 + b in another order.
        # Each result is within 3 roundings (half a float32 ulp each) of the exact sum of |terms|, so two
        # results differ by at most 6 half-ulps of it.
        bound = 3 * np.finfo(np.float32).eps * (np.abs(batch[0]) @ np.abs(kernel) + np.abs(bias))
        assert np.all(np.abs(r - runner(batch)[0]) <= bound)
        assert r.shape == (len(batch[0]), 3)
    whole = np.concatenate([b[0] for b in group])
    assert np.array_equal(got[0][1], whole.max(axis=0))  # a max is exact
    assert got[1][1] is None and got[2][1] is None
    assert join(group[:1]) is group[0]  # one batch: as it is
    alone = split_outputs(runner(group[0]), ["rows", "reduced"], [4])
    assert len(alone) == 1 and alone[0][0].shape == (4, 3) and alone[0][1].shape == (2,)


def test_tensorflow_probes_are_lightly_optimized_and_compute_what_the_optimized_model_does():
    """Inside `lightly_optimized`, the thread calls functions with the arithmetic optimizer alone; outside, and
    after a failure, its options are as they were. A probe's outputs are those of the same function under the
    default options (the model's own ``predict``), bit for bit, on a model whose arithmetic the optimizer
    rewrites (with no optimizer at all, they differ)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the graph optimizer is TensorFlow's")
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    from qstrat.passes.runner import lightly_optimized

    def rewrites():
        config = config_pb2.ConfigProto()
        config.ParseFromString(context.context().function_call_options.config_proto_serialized)
        return config.graph_options.rewrite_options

    off = rewriter_config_pb2.RewriterConfig.OFF
    before = context.context().function_call_options
    assert rewrites().remapping != off
    with lightly_optimized():
        r = rewrites()
        assert r.arithmetic_optimization != off and r.remapping == off and r.constant_folding == off
        assert r.layout_optimizer == off and r.meta_optimizer_iterations == rewriter_config_pb2.RewriterConfig.ONE
    assert context.context().function_call_options is before
    with pytest.raises(ValueError), lightly_optimized():
        raise ValueError("a failing batch")
    assert context.context().function_call_options is before

    # Two conv + BatchNormalization branches added, as in a residual block: the optimizer rewrites the sum of
    # the two (x * scale + offset) as one sum of four terms, which rounds differently.
    i = keras.Input((12, 12, 3))
    rng = np.random.default_rng(2)
    branches = []
    for name in ("a", "b"):
        bn = keras.layers.BatchNormalization(name=f"{name}_bn")
        branches.append(bn(keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name=name)(i)))
        bn.set_weights([rng.uniform(0.5, 2, 16), rng.normal(size=16), rng.normal(size=16), rng.uniform(0.1, 3, 16)])
    x = keras.layers.Add()(branches)
    model = keras.Model(i, [x, keras.layers.Conv2D(8, 3)(x)])
    batch = rng.normal(size=(16, 12, 12, 3)).astype("float32")
    spec = tf.TensorSpec((None, 12, 12, 3), tf.float32)
    optimized = tf.function(lambda t: model(t, training=False), input_signature=[spec], autograph=False)
    want = [np.asarray(o) for o in optimized(batch)]
    got = BatchRunner(model)([batch])
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


@pytest.mark.portable
def test_merged_never_joins_batches_of_other_shapes(monkeypatch):
    """A model with free dimensions reads images of several sizes: batches of 4 at 8x8 and 12x10 stay apart."""
    from qstrat.passes import runner

    monkeypatch.setattr(runner, "merge_width", lambda batch, per_sample: 8)
    rng = np.random.default_rng(0)
    shapes = [(4, 8, 8, 3), (4, 8, 8, 3), (4, 12, 10, 3), (4, 8, 8, 3)]
    batches = [[rng.normal(size=s).astype("float32")] for s in shapes]
    got = list(runner.merged(iter(batches), 1))
    assert [len(g) for g in got] == [2, 1, 1]
    assert [runner.join(g)[0].shape for g in got] == [(8, 8, 8, 3), (4, 12, 10, 3), (4, 8, 8, 3)]
