"""The demo runs end to end on the real bundled model and images."""

import re

from qstrat import demo


def test_demo_quantizes_real_model(capsys):
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "58,423 parameters" in out and "100 faces" in out
    mean = re.search(r"^mean\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert mean, out
    pof2, fs = float(mean.group(1)), float(mean.group(2))
    # 8-bit activations on real images: both well above 30 dB, float scales ahead of power-of-2.
    assert pof2 > 30 and fs > pof2
    assert "constant in the number of batches" in out
