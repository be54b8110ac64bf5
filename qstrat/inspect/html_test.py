"""The HTML report: self-contained, written atomically, a row and histograms for every layer; and a real
browser (headless Chromium) renders the mini-Xception's report with its plots."""

import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import qstrat
from qstrat import zoo
from qstrat.inspect import analyze


def _analysis(model, x, strategy="pof2s"):
    qmodel = qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0)
    return analyze(model, qmodel, x, verbose=0)


@pytest.fixture(scope="module")
def digits_analysis():
    x, _, _, _ = zoo.digits_split()
    return _analysis(zoo.digits_cnn(), x[:96])


@pytest.mark.portable
def test_the_report_is_self_contained_and_names_every_layer(tmp_path, digits_analysis):
    path = tmp_path / "report.html"
    digits_analysis.write_html(str(path))
    text = path.read_text()
    rows = re.findall(r"<tr(?: class=\"top\")?><td>", text)
    assert len(rows) == len(digits_analysis.layers)
    for la in digits_analysis.layers:
        assert f"<td class='name'>{la.name}</td>" in text
    quantizers = sum(len(la.ranges) for la in digits_analysis.layers)
    assert text.count("<svg") == 2 + quantizers  # SQNR, sensitivity, one histogram per quantizer
    assert not re.search(
        r"<(script|link|img)\b|\bsrc=|url\((?!#)", text
    )  # nothing to fetch (url(#id): within the page)
    assert digits_analysis.bypass_sqnr_db > 100  # bias corrections taken out of the float reference


@pytest.mark.portable
def test_the_report_is_written_atomically(tmp_path, monkeypatch, digits_analysis):
    path = tmp_path / "report.html"
    path.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(
        qstrat.QstratError, match=r"report.html: cannot write the file \(disk full\); nothing was written"
    ):
        digits_analysis.write_html(str(path))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    with pytest.raises(qstrat.ConfigError, match="does not exist"):
        digits_analysis.write_html(str(tmp_path / "missing" / "r.html"))


def test_the_bypassed_reference_survives_save_and_load(tmp_path):
    x, _, _, _ = zoo.digits_split()
    model = zoo.digits_cnn()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x[:128], verbose=0)
    qmodel.save(tmp_path / "q.keras")
    loaded = qstrat.load_model(str(tmp_path / "q.keras"))
    a = analyze(model, loaded, x[:64], alone=False, verbose=0)
    b = analyze(model, qmodel, x[:64], alone=False, verbose=0)
    assert a.bypass_sqnr_db > 100 and a.output_sqnr_db == b.output_sqnr_db


def test_chromium_renders_the_mini_xception_report(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: make test installs Debian's chromium package"
    result = _analysis(zoo.emotion_model(), zoo.face_images_n(48).astype(np.float32))
    path = tmp_path / "fer.html"
    result.write_html(str(path))
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    quantizers = sum(len(la.ranges) for la in result.layers)
    assert dom.count("<svg") == 2 + quantizers
    body = dom.split('<table id="layers">', 1)[1].split("</table>", 1)[0]
    assert body.count("<tr") == 1 + len(result.layers)  # the header and a row per layer
    assert len(result.layers) > 30
