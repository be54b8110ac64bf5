"""The demo runs end to end on the real bundled models and data (once: `ran`), and prints it as a table or
as JSON, with nothing else on stdout."""

import json
import re

import pytest

from qstrat import demo

MODELS, STRATEGIES = ("digits CNN", "mini-Xception"), ("pof2s", "fs")


@pytest.fixture(scope="module")
def ran():
    return demo.run()


def test_demo_quantizes_two_real_models(ran):
    out = demo.table(ran)
    rows = {
        (m.group(1), m.group(2)): m.groups()[2:]
        for m in re.finditer(
            r"^(digits CNN|mini-Xception)\s+(pof2s|fs)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)", out, re.M
        )
    }
    assert set(rows) == {(m, s) for m in MODELS for s in STRATEGIES}, out
    float_acc, pof2s_acc = float(rows[("digits CNN", "pof2s")][0]), float(rows[("digits CNN", "pof2s")][1])
    fs_acc = float(rows[("digits CNN", "fs")][1])
    assert float_acc > 95
    assert pof2s_acc >= float_acc - 0.5 and fs_acc >= float_acc - 0.3
    assert float(rows[("mini-Xception", "fs")][2]) > 94  # top-1 agreement with float


def test_demo_speaks_json(ran, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda: ran)  # main's printing, on the results of the one run
    assert demo.main(as_json=True) == 0
    d = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert {(r["model"], r["strategy"]) for r in d["rows"]} == {(m, s) for m in MODELS for s in STRATEGIES}
    fs = next(r for r in d["rows"] if r["model"] == "mini-Xception" and r["strategy"] == "fs")
    assert fs["results"]["agreement"] > 0.94 and fs["quantized_layers"] > 0
    assert demo.main() == 0
    printed = capsys.readouterr().out
    assert printed.startswith("qstrat demo: Keras ") and demo.table(ran) in printed and "done in" in printed
