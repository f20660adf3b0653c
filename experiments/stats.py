"""The statistics of the reward comparison (experiments/reward_study.py): the paired bootstrap
interval of a difference, the mean's bootstrap interval, and Spearman's rank correlation with ties.

Plain numpy, no torch: every function takes lists or arrays of per-prompt (or per-candidate)
numbers and returns floats.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
"""Bootstrap resamples (the issue's 10,000)."""


def percentile_interval(stats, level: float = 0.95) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 percentiles of bootstrap statistics (linear
    interpolation between order statistics, numpy's default)."""
    lo, hi = np.percentile(
        np.asarray(stats, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)]
    )
    return float(lo), float(hi)


def bootstrap_means(x, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """The means of `resamples` resamples of x (drawn with replacement, same size), seeded:
    (n,) -> (resamples,)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap needs a non-empty list of numbers, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    return x[idx].mean(axis=1)


def mean_interval(x, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of x and its percentile bootstrap interval: {mean, lo, hi}."""
    lo, hi = percentile_interval(bootstrap_means(x, resamples, seed), level)
    return dict(mean=float(np.mean(x)), lo=lo, hi=hi)


def paired_difference(a, b, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """mean(a - b) over paired items (prompts) with its paired percentile bootstrap interval: the
    prompts are resampled together, so a[i] and b[i] stay paired. {diff, lo, hi, excludes_0}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: {a.shape} and {b.shape} are not the same prompts")
    return as_difference(mean_interval(a - b, resamples, seed, level))


def as_difference(r: dict) -> dict:
    """A mean difference's {mean, lo, hi} as {diff, lo, hi, excludes_0}."""
    return dict(diff=r["mean"], lo=r["lo"], hi=r["hi"], excludes_0=bool(r["lo"] > 0 or r["hi"] < 0))


def ranks(x) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span ("average" ranks):
    [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x, y) -> float:
    """Spearman's rho with ties: the Pearson correlation of the average ranks. NaN when either side
    is constant (all tied: no ranking to correlate)."""
    rx, ry = ranks(x), ranks(y)
    if len(rx) != len(ry):
        raise ValueError(f"spearman: {len(rx)} and {len(ry)} values")
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def within_prompt_spearman(reward, correct, num_samples: int) -> tuple[float, int]:
    """Spearman of reward with correctness among each prompt's N candidates (rows b*N .. b*N+N-1),
    averaged over the prompts where it is defined: (mean rho, prompts skipped because their
    rewards or their correctness were all tied). NaN when every prompt is skipped."""
    reward, correct = np.asarray(reward, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    rhos = [
        spearman(reward[i : i + num_samples], correct[i : i + num_samples])
        for i in range(0, len(reward), num_samples)
    ]
    kept = [r for r in rhos if not math.isnan(r)]
    return (float(np.mean(kept)) if kept else float("nan")), len(rhos) - len(kept)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def prompt_auc(score, correct) -> float | None:
    """The probability that a correct candidate of one prompt outranks a wrong one: over every
    (correct, wrong) pair of its candidates, 1 when the correct one scores higher, 1/2 on a tie,
    0 otherwise (the Mann-Whitney U over the pairs). None when the prompt has no correct or no wrong
    candidate: nothing to rank."""
    score, correct = np.asarray(score, dtype=np.float64), np.asarray(correct) > 0.5
    right, wrong = score[correct], score[~correct]
    if right.size == 0 or wrong.size == 0:
        return None
    diff = right[:, None] - wrong[None, :]  # (correct, wrong)
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def within_prompt_auc(score, correct, num_samples: int) -> list[float | None]:
    """prompt_auc of each prompt's N consecutive candidates (rows b*N .. b*N+N-1)."""
    return [
        prompt_auc(score[i : i + num_samples], correct[i : i + num_samples])
        for i in range(0, len(score), num_samples)
    ]


def correlations(reward, correct, n: int) -> dict:
    """Spearman of one reward with one correctness measure: within each prompt's n candidates
    (mean over prompts not all tied; `skipped` counts the others) and across prompts
    (per-prompt means)."""
    within, skipped = within_prompt_spearman(reward, correct, n)
    across = spearman(
        np.asarray(reward).reshape(-1, n).mean(1), np.asarray(correct).reshape(-1, n).mean(1)
    )
    none = lambda v: None if math.isnan(v) else v  # JSON has no NaN: undefined is null
    return dict(within=none(within), skipped=skipped, across=none(across))


# --------------------------------------------------------------------------------------------
# Intervals that include the seeds: seeds resampled, then prompts within each seed
# --------------------------------------------------------------------------------------------


def hierarchical_means(per_seed, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Two-stage bootstrap means of per-prompt values grouped by seed: each resample draws S seeds
    with replacement, then, for every seed drawn, its prompts with replacement, and averages the
    S resampled prompt means. A seed drawn twice gets two independent prompt resamples.
    per_seed: S lists of per-prompt numbers (their lengths may differ) -> (resamples,)."""
    groups = [np.asarray(x, dtype=np.float64) for x in per_seed]
    if not groups or any(g.ndim != 1 or g.size == 0 for g in groups):
        raise ValueError("hierarchical bootstrap needs a non-empty list of numbers for every seed")
    S, rng = len(groups), np.random.default_rng(seed)
    picks = rng.integers(0, S, size=(resamples, S))  # which seed fills each slot
    slot_means = np.stack(  # (S seeds, resamples, S slots): seed s's prompt means, per slot
        [
            bootstrap_means(g, resamples * S, seed + 1 + s).reshape(resamples, S)
            for s, g in enumerate(groups)
        ]
    )
    slots = np.arange(S)[None, :]
    return slot_means[picks, np.arange(resamples)[:, None], slots].mean(axis=1)


def hierarchical_interval(per_seed, resamples: int = RESAMPLES, seed: int = 0, level=0.95) -> dict:
    """The mean over seeds of the per-seed prompt means, with its two-stage (seeds, then prompts)
    percentile bootstrap interval: {mean, lo, hi}."""
    lo, hi = percentile_interval(hierarchical_means(per_seed, resamples, seed), level)
    mean = float(np.mean([np.mean(x) for x in per_seed]))
    return dict(mean=mean, lo=lo, hi=hi)


def hierarchical_difference(a, b, resamples: int = RESAMPLES, seed: int = 0, level=0.95) -> dict:
    """mean(a - b) of two rows measured on the same prompts of the same seeds (a[s][i] and b[s][i]:
    seed s, prompt i), with the two-stage bootstrap interval of the paired differences:
    {diff, lo, hi, excludes_0}."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("hierarchical difference: the rows do not hold the same seeds and prompts")
    diffs = [
        np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)
    ]
    return as_difference(hierarchical_interval(diffs, resamples, seed, level))


def seed_t_interval(values) -> dict:
    """The mean of per-seed values with Student's 95% t interval over the seeds (S - 1 degrees of
    freedom): for a table whose JSON keeps one number per seed and no per-prompt values.
    {mean, lo, hi}; lo = hi = mean for one seed (no spread to measure)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return dict(mean=mean, lo=mean, hi=mean)
    if x.size - 1 not in T_QUANTILES_975:
        raise ValueError(f"seed_t_interval keeps the t quantiles of 2-10 seeds, not {x.size}")
    half = T_QUANTILES_975[x.size - 1] * float(x.std(ddof=1)) / math.sqrt(x.size)
    return dict(mean=mean, lo=mean - half, hi=mean + half)


def seed_t_difference(a, b) -> dict:
    """The mean over seeds of a - b (one value per seed each) with Student's t interval:
    {diff, lo, hi, excludes_0}."""
    return as_difference(seed_t_interval(np.subtract(a, b)))


T_QUANTILES_975 = {
    1: 12.7062,
    2: 4.3027,
    3: 3.1824,
    4: 2.7764,
    5: 2.5706,
    6: 2.4469,
    7: 2.3646,
    8: 2.3060,
    9: 2.2622,
}
"""Student's t 97.5% quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, df), 4 decimals)."""
