"""How qstrat's layers treat a Keras mask (an Embedding's ``mask_zero``, a Masking layer).

A layer that keeps each element where it was passes its input's mask on; one that reduces its inputs to
statistics has no element-wise output to mask. Either way Keras no longer warns that the mask is lost.
"""


class KeepsMask:
    """Element-wise layers (a fake-quantizer, a per-channel affine map, the DPU's hard sigmoid): the output
    has the input's mask."""

    def compute_mask(self, inputs, previous_mask):
        return previous_mask


class EndsMask:
    """Layers whose outputs are statistics of their inputs (calibration taps): no mask goes on."""

    def compute_mask(self, inputs, previous_mask):
        return None
