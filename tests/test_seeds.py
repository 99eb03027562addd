"""The statistics of ``distill.seeds`` against closed forms and textbook values (its run folders and sweep
section: ``tests/test_nightly.py::test_recipes_compared_over_seeds``)."""

import math

import pytest

from distill.seeds import SeedsError, parse_recipe, seeds_needed, t_two_sided, welch


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 6.0, 40.0])
def test_student_t_matches_its_closed_forms(t):
    # df = 1 is Cauchy: P(|T| >= t) = 1 - 2 atan(t) / pi; df = 2: 1 - t / sqrt(2 + t^2)
    assert t_two_sided(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-10)
    assert t_two_sided(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    assert t_two_sided(-t, 2) == pytest.approx(t_two_sided(t, 2))


def test_student_t_matches_the_tables():
    # two-sided 5% critical values: 12.706 (df 1), 2.776 (df 4), 2.228 (df 10), 1.960 (normal)
    for t, df in ((12.706, 1), (2.776, 4), (2.228, 10), (1.959964, 1e7)):
        assert t_two_sided(t, df) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided(3.169, 10) == pytest.approx(0.01, abs=1e-4)
    assert t_two_sided(2.0, 7.5) == pytest.approx((t_two_sided(2.0, 7) + t_two_sided(2.0, 8)) / 2, rel=0.01)


def test_welch_on_planted_seeds():
    # two seeds each, equal spread: Welch's df is exactly 2, t = 0.10 / sqrt(0.0008) = 3.536
    w = welch([0.40, 0.44], [0.50, 0.54])
    t = 0.10 / math.sqrt(0.0008)
    assert w["diff"] == pytest.approx(0.10) and w["t"] == pytest.approx(t) and w["df"] == pytest.approx(2.0)
    assert w["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # 0.0715: a 10-point gain two seeds cannot show
    # unequal spread and sizes: df between min(n) - 1 and the pooled n - 2
    w = welch([0.40, 0.44, 0.42], [0.50, 0.60])
    assert 1.0 < w["df"] < 3.0 and 0.0 < w["p"] < 1.0
    assert welch([0.4], [0.5, 0.6])["p"] is None  # one seed: no spread to test against
    assert welch([0.5, 0.5], [0.5, 0.5])["p"] == 1.0
    assert welch([0.4, 0.4], [0.5, 0.5])["p"] is None  # no spread on either side: not a test


def test_seeds_needed_follows_lehrs_rule():
    # 16 per group tell a difference of one standard deviation (two-sided 5%, power 80%); 4x for half of it
    assert seeds_needed(0.03, 0.03, 0.03) == 16
    assert seeds_needed(0.015, 0.03, 0.03) == 63
    assert seeds_needed(0.0, 0.03, 0.03) is None and seeds_needed(0.03, None, 0.03) is None


def test_recipe_arguments():
    assert parse_recipe("features=runs/a,runs/b") == ("features", ["runs/a", "runs/b"])
    for bad in ("runs/a", "=runs/a", "features="):
        with pytest.raises(SeedsError, match="NAME=RUN"):
            parse_recipe(bad)
