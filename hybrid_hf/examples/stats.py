"""Paired comparisons over seeds: mean and spread of each arm, and a t interval for the mean paired difference.

    summary = paired_t_interval(hybrid=[40.7, 41.2, 40.9], baseline=[41.8, 41.5, 42.0])
    summary["difference"]["low"], summary["difference"]["high"]   # 95% interval of mean(hybrid - baseline)

The interval is Student's t over the per-seed differences (`mean +- t(level, n - 1) * sd / sqrt(n)`), the spread over
seeds of training with everything else fixed; it says nothing about the spread over evaluation texts.
"""

from __future__ import annotations

import math
import statistics

import torch


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (e.g. 4.303 for 0.975 and 2).

    `torch.distributions.StudentT` has no `icdf`: its density is integrated (cumulative trapezoid, float64) over
    `x = tan(u)`, which maps the half line onto `[0, pi/2)` with a smooth integrand, and the cdf inverted by
    interpolation; good to about 1e-6 for `probability` up to 0.999.
    """
    if not 0.5 <= probability < 1:
        raise ValueError(f"probability must be in [0.5, 1), got {probability}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    u = torch.linspace(0.0, math.pi / 2, 200_001, dtype=torch.float64)[:-1]
    grid = torch.tan(u)  # x
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(grid).exp()
    cdf = 0.5 + torch.cat([u.new_zeros(1), torch.cumulative_trapezoid(density / torch.cos(u) ** 2, u)])  # at each x
    index = int(
        torch.searchsorted(cdf, torch.tensor(probability, dtype=torch.float64))
    )  # cdf[index - 1] < p <= cdf[index]
    if index == 0:
        return 0.0
    if index >= len(cdf):
        raise ValueError(f"probability {probability} is too close to 1 for df={df}")
    p0, p1, x0, x1 = cdf[index - 1].item(), cdf[index].item(), grid[index - 1].item(), grid[index].item()
    return x0 + (probability - p0) * (x1 - x0) / (p1 - p0)


def mean_and_sd(values: list[float]) -> dict[str, float | None]:
    """`{"mean", "sd"}` of `values`; `sd` is the sample standard deviation (n - 1), None for a single value."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def paired_t_interval(level: float = 0.95, **arms: list[float]) -> dict:
    """Mean and sd of two arms measured on the same seeds, and the t interval of their mean paired difference.

    Args:
        level: the interval's confidence level.
        **arms: exactly two arms, `name=[value per seed]`, in the same seed order; the difference is first - second.

    Returns:
        `{first: {"mean", "sd"}, second: {...}, "difference": {"of", "mean", "sd", "low", "high", "level", "df",
        "method"}}`; with one seed the interval is None (`low`, `high`, `sd` None).
    """
    if len(arms) != 2:
        raise ValueError(f"paired_t_interval compares exactly two arms, got {len(arms)}: {', '.join(arms)}")
    (first, a), (second, b) = arms.items()
    if len(a) != len(b) or not a:
        raise ValueError(f"the arms need the same number (>= 1) of values, got {len(a)} and {len(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    difference: dict = {
        "of": f"{first} - {second}",
        **mean_and_sd(differences),
        "level": level,
        "df": len(differences) - 1,
        "method": "paired t interval over seeds",
    }
    if len(differences) > 1:
        half = t_quantile(0.5 + level / 2, len(differences) - 1) * difference["sd"] / math.sqrt(len(differences))
        difference.update(low=difference["mean"] - half, high=difference["mean"] + half)
    else:
        difference.update(low=None, high=None)
    return {first: mean_and_sd(a), second: mean_and_sd(b), "difference": difference}


def verdict(difference: dict, lower_is_better: bool = True) -> str:
    """Plain words for a difference summary (first arm minus second): which arm the interval favours, if any."""
    low, high = difference["low"], difference["high"]
    if low is None:
        return "one seed: no interval, so no conclusion either way"
    if low > 0 or high < 0:
        first_better = (high < 0) == lower_is_better
        winner, loser = difference["of"].split(" - ") if first_better else difference["of"].split(" - ")[::-1]
        return f"{winner} beats {loser}: the {difference['level']:.0%} interval excludes zero"
    return f"a tie at this budget: the {difference['level']:.0%} interval includes zero"
