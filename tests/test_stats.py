"""The Wilson interval behind every accuracy interval we report."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixkv.lab.stats import wilson_interval


def test_known_value():
    # 8 of 10: the textbook Wilson 95% interval is [0.490, 0.943]
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_edges_stay_inside_unit_interval():
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] < 0.9


@given(st.integers(1, 500), st.floats(0, 1))
def test_contains_the_estimate_and_narrows_with_n(n, p):
    k = p * n
    lo, hi = wilson_interval(k, n)
    assert 0 <= lo <= p + 1e-12 and p - 1e-12 <= hi <= 1
    lo4, hi4 = wilson_interval(4 * k, 4 * n)
    assert hi4 - lo4 <= hi - lo + 1e-12


@pytest.mark.parametrize("k,n", [(1, 0), (-1, 5), (6, 5)])
def test_bad_input_is_refused(k, n):
    with pytest.raises(ValueError, match="must be"):
        wilson_interval(k, n)


def test_sign_test_known_values():
    from mixkv.lab.stats import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(2, 7) == sign_test_p(7, 2)
    with pytest.raises(ValueError, match="non-negative"):
        sign_test_p(-1, 2)


def test_scores_by_prompt_pairs_methods_on_the_same_prompt():
    from mixkv.lab.stats import scores_by_prompt

    samples = [{"task": "t", "method": "a", "budget": 8, "index": 0, "score": 1.0},
               {"task": "t", "method": "b", "budget": 8, "index": 0, "score": 0.0},
               {"task": "t", "method": "a", "budget": 8, "index": 3, "score": 0.0},
               {"task": "u", "method": "full", "budget": None, "index": 5, "score": 1.0}]
    got = scores_by_prompt(samples)
    assert got[("t", "a", 8)] == {0: 1.0, 3: 0.0} and got[("t", "b", 8)] == {0: 0.0}
    assert got[("u", "full", None)] == {5: 1.0}
