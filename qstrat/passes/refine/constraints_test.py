"""Table tests of the DPU position rules: bounds, their edges, and no change where a bound holds.

Every rule is checked two ways: a table of hand-worked cases (each bound
inside, at and one past its edge), and a property over every position pair
in a range: after the rule the bound holds, and nothing moved when it held
before; when something moved, it moved by the least that satisfies it.
"""

import itertools

import pytest

from qstrat.passes.refine import constraints as C

pytestmark = pytest.mark.portable

POS = range(-4, 30)


@pytest.mark.parametrize(
    "ipos,opos,expected",
    [
        (5, 8, (5, 8)),  # inside every bound
        (0, 7, (0, 7)),  # at the low edges
        (15, 28, (15, 28)),  # shift 14 + 15 - 28 = 1 > 0
        (-1, 7, (0, 7)),  # input below 0
        (16, 9, (15, 9)),  # input above 15
        (5, 6, (5, 7)),  # output below 7
        (0, 14, (0, 14)),  # shift 0: not allowed, opos = 14 + ipos
        (0, 15, (0, 14)),
        (3, 17, (3, 17)),  # shift 0 -> opos stays 17 = 14 + 3
        (3, 18, (3, 17)),  # shift -1
        (20, 40, (15, 29)),  # both: ipos to 15, then opos to 14 + 15
    ],
)
def test_sigmoid_table(ipos, opos, expected):
    assert C.sigmoid_positions(ipos, opos) == expected


def test_sigmoid_holds_after_and_changes_only_violations():
    for ipos, opos in itertools.product(POS, POS):
        i, o = C.sigmoid_positions(ipos, opos)
        assert 0 <= i <= 15 and o >= 7 and 14 + i - o >= 0
        if 0 <= ipos <= 15 and opos >= 7 and 14 + ipos - opos >= 0:
            assert (i, o) == (ipos, opos)


def test_sigmoid_shift_edge():
    # The rule asks shift_sigmoid > 0 and sets opos := 14 + ipos when it is <= 0, which makes it 0:
    # the reference's own fix-up; the bound the rule leaves is shift >= 0.
    assert C.sigmoid_positions(3, 17) == (3, 17)
    assert C.sigmoid_positions(3, 16) == (3, 16)


@pytest.mark.parametrize(
    "ipos,expected",
    [
        ([3, 18], [3, 18]),  # difference 15: allowed
        ([3, 19], [3, 18]),  # 16: the larger comes down
        ([19, 3], [18, 3]),
        ([-2, 20, 5], [-2, 13, 5]),
        ([7, 7], [7, 7]),
    ],
)
def test_shift_read_table(ipos, expected):
    assert C.shift_read(ipos) == expected


@pytest.mark.parametrize(
    "ipos,opos,expected",
    [
        ([3, 9], -12, -12),  # 3 - (-12) = 15: allowed
        ([3, 9], -13, -12),  # 16
        ([3, 9], 18, 18),  # -15
        ([3, 9], 19, 18),  # -16
        ([5], 5, 5),
    ],
)
def test_shift_write_table(ipos, opos, expected):
    assert C.shift_write(ipos, opos) == expected


@pytest.mark.parametrize(
    "x,s,opos,expected",
    [
        (4, 7, 11, 11),  # shift 0
        (4, 7, 12, 11),  # -1
        (4, 7, -4, -4),  # 15
        (4, 7, -5, -4),  # 16
        (4, 7, 6, 6),
    ],
)
def test_shift_swish_table(x, s, opos, expected):
    assert C.shift_swish(x, s, opos) == expected


@pytest.mark.parametrize(
    "wpos,ipos,opos,expected",
    [
        (7, 5, 12, 7),  # shift_cut 0
        (7, 5, 13, 8),  # -1: wpos up by 1
        (7, 5, -4, 7),  # 16
        (7, 5, -5, 6),  # 17: wpos down by 1
        (30, 4, 2, 14),  # 32 -> 16
    ],
)
def test_shift_cut_table(wpos, ipos, opos, expected):
    assert C.shift_cut(wpos, ipos, opos) == expected


@pytest.mark.parametrize(
    "wpos,ipos,bpos,opos,expected",
    [
        (7, 6, -3, 5, -3),  # shift_bias 16: allowed
        (7, 6, -4, 5, -3),  # 17: bpos up
        (7, 6, 21, 5, 21),  # shift_cut 8: lower bound -8, shift_bias -8: allowed
        (7, 6, 22, 5, 21),  # -9
        (7, 6, 13, 13, 13),  # shift_cut 0: lower bound -16, shift_bias 0
        (7, 6, 29, 13, 29),  # -16: allowed
        (7, 6, 30, 13, 29),  # -17
        (7, 6, 13, -3, 13),  # shift_cut 16: lower bound 0, shift_bias 0: allowed
        (7, 6, 14, -3, 13),  # -1
    ],
)
def test_shift_bias_table(wpos, ipos, bpos, opos, expected):
    assert C.shift_bias(wpos, ipos, bpos, opos) == expected


def test_shift_bias_range_keeps_the_bias_in_24_bits():
    for wpos, ipos, opos in itertools.product(range(0, 12), range(0, 12), range(-4, 20)):
        sc = wpos + ipos - opos
        lo, hi = C.shift_bias_range(wpos, ipos, opos)
        assert hi == 16
        if 0 <= sc <= 16:
            # A bias finer than the product grid by -lo bits: 8 output bits + shift_cut + those bits = 24 at most.
            assert 8 + sc - lo == 24 or (lo == 0 and 8 + sc >= 24)


@pytest.mark.parametrize(
    "wpos,ipos,bpos,expected",
    [
        (7, 6, 13, 13),  # shift_bias 0
        (7, 6, 14, 13),  # -1
        (7, 6, -3, -3),  # 16
        (7, 6, -4, -3),  # 17
    ],
)
def test_shift_bias_leakyrelu_table(wpos, ipos, bpos, expected):
    assert C.shift_bias_leakyrelu(wpos, ipos, bpos) == expected


def test_align_concat_and_pool():
    assert C.align_concat([5, 7], 6) == 5
    assert C.align_concat([5, 5], 5) == 5
    assert C.align_concat([8, 9], 3) == 3
    assert C.align_pool(6, 4) == 4
    assert C.align_pool(4, 6) == 4
    assert C.align_pool(5, 5) == 5


def test_every_shift_rule_holds_after_and_moves_the_least():
    for a, b, c in itertools.product(POS, POS, range(-4, 30, 3)):
        sr = C.shift_read([a, b])
        assert max(sr) - min(sr) <= 15
        assert sr == [a, b] or max(a, b) - min(a, b) > 15
        assert sorted(sr)[0] == min(a, b)  # the lowest input never moves

        sw = C.shift_write([a, b], c)
        assert -15 <= min(a, b) - sw <= 15
        assert sw == c or abs(min(a, b) - c) > 15
        assert abs(sw - c) == max(0, abs(min(a, b) - c) - 15)

        sx = C.shift_swish(a, b, c)
        assert 0 <= a + b - sx <= 15
        assert sx == c or not 0 <= a + b - c <= 15

        w = C.shift_cut(a, b, c)
        assert 0 <= w + b - c <= 16
        assert w == a or not 0 <= a + b - c <= 16
        assert abs(w - a) == max(0, -(a + b - c), (a + b - c) - 16)


def test_shift_bias_property():
    for wpos, ipos, bpos, opos in itertools.product(range(0, 10), range(0, 10, 3), range(-8, 40, 2), range(0, 12, 2)):
        new = C.shift_bias(wpos, ipos, bpos, opos)
        lo, hi = C.shift_bias_range(wpos, ipos, opos)
        assert lo <= wpos + ipos - new <= hi
        if lo <= wpos + ipos - bpos <= hi:
            assert new == bpos
        leaky = C.shift_bias_leakyrelu(wpos, ipos, bpos)
        assert 0 <= wpos + ipos - leaky <= 16
        assert leaky == bpos or not 0 <= wpos + ipos - bpos <= 16
