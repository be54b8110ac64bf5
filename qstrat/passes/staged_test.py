"""StagedSums: each stage's channel sums are those of the whole graph run at once, bit for bit."""

import keras
import numpy as np
import pytest

from qstrat.graph import capture
from qstrat.graph.ir import TensorRef
from qstrat.graph.rebuild import replay
from qstrat.layers.probe import SampleChannelSums

L = keras.layers


def test_stages_give_the_sums_of_the_whole_graph_and_hand_over_what_later_stages_need():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("stages are traced TensorFlow functions")
    import tensorflow as tf

    from qstrat.passes.refine.bias_correction import _levels
    from qstrat.passes.staged import StagedSums

    # A skip connection from the first conv to the add crosses a stage boundary: stage 0 hands a's output on.
    i = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(i)
    b = L.Conv2D(4, 3, padding="same", name="b")(L.ReLU(name="ra")(a))
    c = L.Conv2D(4, 3, padding="same", name="c")(L.ReLU(name="rb")(b))
    d = L.Conv2D(4, 1, name="d")(L.Add(name="add")([a, c]))
    model = keras.Model(i, L.Dense(2, name="e")(L.GlobalAveragePooling2D(name="gap")(d)))
    graph = capture(model)
    names = ["a", "b", "c", "d", "e"]
    refs = [TensorRef(name, 0) for name in names]
    levels = _levels(graph, names)
    assert levels == [0, 1, 2, 3, 4]
    staged = StagedSums(graph, lambda node: node.op, refs, levels, stages=3)
    assert staged.stages == 3 and staged.targets == [[0, 1], [2, 3], [4]]
    assert staged._takes[1] == [TensorRef("a", 0), TensorRef("b", 0)]  # a's output skips stage 1's first layers
    assert staged._hands == [[TensorRef("a", 0), TensorRef("b", 0)], [TensorRef("d", 0)], []]
    sums = SampleChannelSums()
    whole = tf.function(lambda x: sums(replay(graph, lambda node: node.op, [x], refs)), autograph=False)
    batch = [np.random.default_rng(0).normal(size=(7, 8, 8, 3)).astype("float32")]
    want = whole(batch[0])[0].numpy()
    offsets = np.cumsum([0] + [4, 4, 4, 4, 2])
    for stage, targets in enumerate(staged.targets):
        got, counts = staged(batch, stage)
        cols = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in targets])
        np.testing.assert_array_equal(got, want[:, cols])
        np.testing.assert_array_equal(counts, [[64, 64, 64, 64, 1][t] for t in targets])  # 8x8 maps; dense: 1
