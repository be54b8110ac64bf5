"""Progress: stage times are recorded, passes counted, and nothing is printed at verbose=0."""

import io

import pytest

from qstrat.progress import Progress

pytestmark = pytest.mark.portable


def test_silent_progress_still_records_times_and_passes():
    out = io.StringIO()
    p = Progress(verbose=0, stream=out)
    with p.stage("a"):
        bar = p.data_pass(4, "batch")
        for k in range(4):
            bar.update(k + 1)
    with p.stage("b"):
        p.data_pass(3, "level", passes=2)
    with p.stage("a"):
        pass
    assert set(p.times) == {"a", "b"} and all(t >= 0 for t in p.times.values())
    assert p.data_passes == 3
    p.done("finished")
    assert out.getvalue() == ""


def test_verbose_progress_names_stages_and_numbers_the_passes():
    out = io.StringIO()
    p = Progress(verbose=1, stream=out)
    with p.stage("calibrate"):
        p.data_pass(2, "batch", what="statistics")
    with p.stage("correct"):
        p.data_pass(5, "level", passes=3)
    p.done("quantized")
    text = out.getvalue()
    assert "qstrat: pass 1 over the calibration data: statistics" in text
    assert "qstrat: passes 2-4 over the calibration data" in text
    assert "qstrat: calibrate: " in text and "qstrat: correct: " in text
    assert "(4 passes over the calibration data)" in text


def test_a_failing_stage_still_records_its_time():
    p = Progress(verbose=0)
    with pytest.raises(ValueError), p.stage("boom"):
        raise ValueError("x")
    assert "boom" in p.times
