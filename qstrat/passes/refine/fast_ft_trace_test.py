"""Fast finetune on TensorFlow: each block's training step is traced once."""

import keras
import pytest

import qstrat
from qstrat.passes.refine.fast_ft_test import FT, _data, _model

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="counts TensorFlow traces")


def test_each_block_traces_its_training_step_once(monkeypatch):
    from qstrat.passes.refine import fast_ft, soft_round

    traced = []

    def counted(self, data):  # on TensorFlow, Python runs the step only while tracing it
        traced.append(self.name)
        return keras.Model.train_step(self, data)

    monkeypatch.setattr(soft_round.Trainer, "train_step", counted, raising=False)
    monkeypatch.setattr(fast_ft, "MIN_STEPS", 8)
    q = qstrat.Quantizer(_model(), "pof2s")
    q.quantize_model(_data(), verbose=0, weight_bit=4, include_bias_corr=False, **FT)
    trained = [f"qstrat_fast_ft_{b.layer}_rounding" for b in q.fast_finetune.blocks if b.epochs]
    assert len(trained) == 5 and traced == trained
