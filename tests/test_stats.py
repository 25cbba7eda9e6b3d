"""The statistics of the seeded A/B: Student's t quantiles against published table values, and the paired interval
against a hand computation."""

from __future__ import annotations

import math

import pytest

from hybrid_hf.examples.stats import paired_t_interval, t_quantile, verdict

# Two-sided 95% (p = 0.975) and 99% (p = 0.995) critical values of Student's t, from printed tables.
T_TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 3): 3.182,
    (0.975, 4): 2.776,
    (0.975, 9): 2.262,
    (0.975, 29): 2.045,
    (0.995, 2): 9.925,
    (0.995, 4): 4.604,
    (0.95, 5): 2.015,
}


@pytest.mark.parametrize(("probability", "df"), sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(probability, df):
    assert t_quantile(probability, df) == pytest.approx(T_TABLE[probability, df], abs=6e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="probability must be in"):
        t_quantile(0.3, 2)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        t_quantile(0.975, 0)


def test_paired_interval_by_hand():
    hybrid, baseline = [40.0, 41.0, 42.5], [41.0, 41.5, 43.5]
    summary = paired_t_interval(hybrid=hybrid, baseline=baseline)
    # differences -1, -0.5, -1: mean -5/6, sd sqrt(((1/6)^2 * 2 + (1/3)^2) / 2) = sqrt(1/12)
    mean, sd = -5 / 6, math.sqrt(1 / 12)
    half = 4.302653 * sd / math.sqrt(3)
    difference = summary["difference"]
    assert difference["mean"] == pytest.approx(mean) and difference["sd"] == pytest.approx(sd)
    assert (difference["low"], difference["high"]) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert summary["hybrid"]["mean"] == pytest.approx(41.166666, abs=1e-5)
    assert summary["baseline"]["sd"] == pytest.approx(math.sqrt(((41 - 42) ** 2 + 0.5**2 + 1.5**2) / 2))
    assert difference["of"] == "hybrid - baseline" and difference["df"] == 2
    assert difference["high"] == pytest.approx(-0.1162, abs=1e-4)  # below zero: the hybrid's lower perplexity wins
    assert verdict(difference) == "hybrid beats baseline: the 95% interval excludes zero"


def test_verdict_names_the_winner_only_when_the_interval_excludes_zero():
    hybrid_better = paired_t_interval(hybrid=[40.0, 40.1, 40.2], baseline=[41.0, 41.2, 41.1])["difference"]
    assert hybrid_better["high"] < 0
    assert verdict(hybrid_better).startswith("hybrid beats baseline")
    baseline_better = paired_t_interval(hybrid=[42.0, 42.1, 42.2], baseline=[41.0, 41.2, 41.1])["difference"]
    assert verdict(baseline_better).startswith("baseline beats hybrid")
    tie = paired_t_interval(hybrid=[40.0, 42.0, 41.0], baseline=[41.0, 41.0, 41.0])["difference"]
    assert tie["low"] < 0 < tie["high"]
    assert verdict(tie) == "a tie at this budget: the 95% interval includes zero"
    one_seed = paired_t_interval(hybrid=[40.0], baseline=[41.0])
    assert one_seed["difference"]["low"] is None and one_seed["hybrid"]["sd"] is None
    assert verdict(one_seed["difference"]).startswith("one seed: no interval")


def test_paired_interval_rejects_unpaired_arms():
    with pytest.raises(ValueError, match="same number"):
        paired_t_interval(hybrid=[1.0, 2.0], baseline=[1.0])
    with pytest.raises(ValueError, match="exactly two arms"):
        paired_t_interval(hybrid=[1.0])
