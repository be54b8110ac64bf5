"""The demo runs end to end on the real bundled models and data."""

import json
import re

from qstrat import demo


def test_demo_quantizes_two_real_models(capsys):
    assert demo.main() == 0
    out = capsys.readouterr().out
    rows = {
        (m.group(1), m.group(2)): m.groups()[2:]
        for m in re.finditer(
            r"^(digits CNN|mini-Xception)\s+(pof2s|fs)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)", out, re.M
        )
    }
    assert set(rows) == {(m, s) for m in ("digits CNN", "mini-Xception") for s in ("pof2s", "fs")}, out
    float_acc, pof2s_acc = float(rows[("digits CNN", "pof2s")][0]), float(rows[("digits CNN", "pof2s")][1])
    fs_acc = float(rows[("digits CNN", "fs")][1])
    assert float_acc > 95
    assert pof2s_acc >= float_acc - 0.5 and fs_acc >= float_acc - 0.3
    assert float(rows[("mini-Xception", "fs")][2]) > 94  # top-1 agreement with float


def test_demo_speaks_json(capsys):
    assert demo.main(as_json=True) == 0
    d = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert {(r["model"], r["strategy"]) for r in d["rows"]} == {
        (m, s) for m in ("digits CNN", "mini-Xception") for s in ("pof2s", "fs")
    }
    fs = next(r for r in d["rows"] if r["model"] == "mini-Xception" and r["strategy"] == "fs")
    assert fs["results"]["agreement"] > 0.94 and fs["quantized_layers"] > 0
