"""A/B analysis on per-unit totals: means, relative lift with a CI, Welch p-value, SRM, CUPED.

Metrics (the unit is the randomization unit, e.g. the user):

- ``clicks_per_user``: the mean over units of each unit's clicks. Welch's t-test (statsmodels
  ``CompareMeans``, unequal variances) gives the p-value and the CI of the difference; the
  relative lift ``mean_t / mean_c - 1`` gets a delta-method CI, ``Var(a/b) ~ Var(a)/b^2 +
  a^2 Var(b)/b^4`` for independent arms (Deng, Knoblich and Lu 2018, "Applying the Delta
  Method in Metric Analytics", KDD, section 3).
- ``ctr``: sum of clicks / sum of impressions per arm, a ratio of two per-unit means. Units,
  not impressions, are independent, so its variance is the delta method's
  ``Var(Ybar/Xbar) ~ (s_Y^2 - 2 R s_XY + R^2 s_X^2) / (n Xbar^2)`` (Deng et al. 2018, section 3);
  the p-value is a z-test on the difference of the two ratios.

CUPED (Deng, Xu, Kohavi and Walker 2013, "Improving the Sensitivity of Online Controlled
Experiments by Utilizing Pre-Experiment Data", WSDM): ``Y' = Y - theta (X - mean X)`` with
``theta = Cov(X, Y) / Var(X)`` pooled over arms, X the unit's pre-period metric; the means of
Y' are unbiased for those of Y, with variance reduced by ``corr(X, Y)^2``.

Sample-ratio mismatch (SRM): a chi-square goodness-of-fit test of the units per arm against
the configured weights (``scipy.stats.chisquare``); p < 0.001 flags the result as
untrustworthy (Fabijan et al. 2019, "Diagnosing Sample Ratio Mismatch in Online Controlled
Experiments", KDD, use 0.0005). Losing 5% of one arm's units gives p ~ 1e-15 at 100,000
units, but only p ~ 3e-4 on average at 20,000.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from fm_keras.errors import ConfigError, DataError
from fm_keras.experiments.config import METRICS, ABExperiment
from fm_keras.experiments.events import PRE_PERIOD

SRM_ALPHA = 0.001


def relative_lift(mean_t: float, var_t: float, mean_c: float, var_c: float,
                  alpha: float = 0.05) -> dict:
    """``mean_t / mean_c - 1`` with a delta-method CI (Deng et al. 2018).

    Args:
        mean_t, mean_c: the treatment and control estimates (e.g. sample means).
        var_t, var_c: the variances of those estimates (e.g. s^2 / n), arms independent.
        alpha: 1 - confidence level.

    Returns:
        ``{"lift", "ci_low", "ci_high", "se"}`` (fractions: 0.05 is +5%).
    """
    if mean_c == 0:
        return {"lift": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "se": float("nan")}
    lift = mean_t / mean_c - 1.0
    se = float(np.sqrt(var_t / mean_c**2 + mean_t**2 * var_c / mean_c**4))
    z = stats.norm.ppf(1 - alpha / 2)
    return {"lift": float(lift), "ci_low": float(lift - z * se), "ci_high": float(lift + z * se),
            "se": se}


def ratio_estimate(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float]:
    """``sum(num) / sum(den)`` over units and its delta-method variance (Deng et al. 2018).

    Args:
        numerator, denominator: per-unit totals, float arrays [units] (e.g. clicks and
            impressions).

    Returns:
        (ratio, variance of the ratio).
    """
    n = len(numerator)
    mean_y, mean_x = float(np.mean(numerator)), float(np.mean(denominator))
    ratio = mean_y / mean_x
    cov = np.cov(numerator, denominator, ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (n * mean_x**2)
    return ratio, float(var)


def welch(y_t: np.ndarray, y_c: np.ndarray, alpha: float = 0.05) -> dict:
    """Welch's t-test of ``mean(y_t) - mean(y_c)`` (statsmodels, unequal variances).

    Returns:
        ``{"difference", "ci_low", "ci_high", "p_value", "t"}`` of the absolute difference.
    """
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    compare = CompareMeans(DescrStatsW(y_t), DescrStatsW(y_c))
    t, p, _ = compare.ttest_ind(usevar="unequal")
    low, high = compare.tconfint_diff(alpha=alpha, usevar="unequal")
    return {"difference": float(np.mean(y_t) - np.mean(y_c)), "ci_low": float(low),
            "ci_high": float(high), "p_value": float(p), "t": float(t)}


def srm_check(counts: dict[str, int], weights: dict[str, float],
              alpha: float = SRM_ALPHA) -> dict:
    """Chi-square test of units per arm against the configured weights.

    Returns:
        ``{"chi2", "p_value", "observed", "expected", "flagged"}``; flagged when p < alpha.
    """
    names = list(weights)
    observed = np.array([counts.get(a, 0) for a in names], dtype=np.float64)
    expected = np.array([weights[a] for a in names]) * observed.sum()
    chi2, p = stats.chisquare(observed, expected)
    return {"chi2": float(chi2), "p_value": float(p), "alpha": alpha,
            "observed": {a: int(o) for a, o in zip(names, observed)},
            "expected": {a: float(e) for a, e in zip(names, expected)},
            "flagged": bool(p < alpha)}


def cuped_theta(y: np.ndarray, x: np.ndarray) -> float:
    """CUPED's ``theta = Cov(X, Y) / Var(X)`` (Deng et al. 2013), 0 when X is constant."""
    var_x = float(np.var(x, ddof=1))
    return 0.0 if var_x == 0 else float(np.cov(x, y, ddof=1)[0, 1] / var_x)


def compare_arms(units: pd.DataFrame, treatment: str, control: str, metric: str,
                 alpha: float = 0.05) -> dict:
    """One treatment arm against control on a per-unit table.

    Args:
        units: one row per unit with ``arm``, ``clicks``, ``impressions`` and ``value`` (the
            per-unit metric, CUPED-adjusted or not, for ``clicks_per_user``).
        treatment, control: arm names.
        metric: ``clicks_per_user`` or ``ctr``.

    Returns:
        ``{"arm", "lift", "ci_low", "ci_high", "se", "p_value", "difference",
        "difference_ci"}``.
    """
    t, c = units[units["arm"] == treatment], units[units["arm"] == control]
    if metric == "clicks_per_user":
        y_t, y_c = t["value"].to_numpy(float), c["value"].to_numpy(float)
        lift = relative_lift(y_t.mean(), y_t.var(ddof=1) / len(y_t),
                             y_c.mean(), y_c.var(ddof=1) / len(y_c), alpha)
        test = welch(y_t, y_c, alpha)
        return {"arm": treatment, **lift, "p_value": test["p_value"],
                "difference": test["difference"],
                "difference_ci": [test["ci_low"], test["ci_high"]], "test": "welch"}
    r_t, v_t = ratio_estimate(t["clicks"].to_numpy(float), t["impressions"].to_numpy(float))
    r_c, v_c = ratio_estimate(c["clicks"].to_numpy(float), c["impressions"].to_numpy(float))
    lift = relative_lift(r_t, v_t, r_c, v_c, alpha)
    z = (r_t - r_c) / np.sqrt(v_t + v_c)
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(v_t + v_c)
    return {"arm": treatment, **lift, "p_value": float(2 * stats.norm.sf(abs(z))),
            "difference": float(r_t - r_c),
            "difference_ci": [float(r_t - r_c - half), float(r_t - r_c + half)],
            "test": "delta-method z"}


def analyze(table: pd.DataFrame, experiment: ABExperiment, metric: str = "clicks_per_user",
            cuped: bool = False, alpha: float = 0.05, check_assignment: bool = True,
            source: str = "events") -> dict:
    """The full analysis of a per-unit table (``events.per_unit``).

    Args:
        table: one row per (unit, arm) with events, impressions, clicks, first_timestamp and
            optionally pre_period.
        experiment: arms, weights, control.
        metric: ``clicks_per_user`` or ``ctr``.
        cuped: adjust ``clicks_per_user`` with the pre-period metric.
        alpha: 1 - confidence level of the CIs.
        check_assignment: recompute each unit's arm from the salt and count mismatches.
        source: the events' name, for messages.

    Returns:
        A JSON-ready dict: arms, comparisons against control, srm, checks, trustworthy.

    Raises:
        ConfigError: an unknown metric, or CUPED with ``ctr``.
        DataError: an arm without events or with fewer than 2 units, ``ctr`` with an arm
            without impressions, or CUPED without a pre_period column.

    A statistic that is undefined on valid data (the lift over a control whose mean is 0, the
    p-value of two constant arms) is NaN; ``fm-keras ab`` prints it as JSON ``null``.
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {list(METRICS)}, got {metric!r}")
    if cuped and metric != "clicks_per_user":
        raise ConfigError("--cuped: CUPED is implemented for clicks_per_user (a per-unit mean); "
                          "drop --cuped for ctr")
    if cuped and PRE_PERIOD not in table.columns:
        raise DataError(f"{source}: column {PRE_PERIOD!r} is missing: --cuped needs each "
                        "unit's pre-period metric")
    arms_of_unit = table.groupby("unit")["arm"].transform("size")
    contaminated = int(table.loc[arms_of_unit > 1, "unit"].nunique())
    units = table[arms_of_unit == 1].copy()
    for name in experiment.arm_names:
        arm_units = units[units["arm"] == name]
        if arm_units.empty:
            raise DataError(f"{source}: arm {name!r} has no events (arms with events: "
                            f"{sorted(set(units['arm']))}); check the logging of that arm")
        if len(arm_units) < 2:
            raise DataError(f"{source}: arm {name!r} has events of only {len(arm_units)} unit; "
                            "a variance needs at least 2 units per arm")
        if metric == "ctr" and arm_units["impressions"].sum() == 0:
            raise DataError(f"{source}: column 'impressions': arm {name!r} has 0 impressions, "
                            "so its ctr is undefined; use --metric clicks_per_user")
    mismatches, hint = None, None
    if check_assignment:
        from fm_keras.experiments.assignment import Assigner

        expected = Assigner(experiment).assign(units["unit"].tolist())
        wrong = expected != units["arm"].to_numpy()
        mismatches = int(wrong.sum())
        if mismatches:
            hint = float_id_hint(units.loc[wrong, "unit"], units.loc[wrong, "arm"], experiment)
    units["value"] = units["clicks"].astype(float)
    cuped_info = None
    if cuped:
        x = units[PRE_PERIOD].to_numpy(float)
        y = units["value"].to_numpy(float)
        theta = cuped_theta(y, x)
        units["value"] = y - theta * (x - x.mean())
        with np.errstate(divide="ignore", invalid="ignore"):  # constant Y: NaN
            cuped_info = {"theta": theta, "variance_reduction": float(
                1 - np.var(units["value"], ddof=1) / np.var(y, ddof=1))}
    counts = units["arm"].value_counts()
    srm = srm_check({a: int(counts.get(a, 0)) for a in experiment.arm_names}, experiment.weights)
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined statistics become NaN
        arms = [_arm_summary(units[units["arm"] == a], a, metric, alpha)
                for a in experiment.arm_names]
        comparisons = [compare_arms(units, a, experiment.control, metric, alpha)
                       for a in experiment.arm_names if a != experiment.control]
    checks = {"units_in_several_arms": contaminated, "assignment_mismatches": mismatches,
              "assignment_hint": hint}
    trustworthy = not srm["flagged"] and contaminated == 0 and not mismatches
    return {"experiment": experiment.name, "metric": metric, "cuped": cuped_info,
            "alpha": alpha, "control": experiment.control, "arms": arms,
            "comparisons": comparisons, "srm": srm, "checks": checks,
            "trustworthy": trustworthy}


def float_id_hint(units: pd.Series, arms: pd.Series, experiment) -> str | None:
    """Why units were logged in another arm than their id assigns, when it is the usual
    cause: integer ids written through a float column (the serving side hashed ``"7"``, the
    events file says ``"7.0"``). None unless stripping ``.0`` gives some of `units` (str
    [n], the mismatched ids) the arm in `arms` (str [n], the arm logged)."""
    from fm_keras.experiments.assignment import Assigner

    stripped = units.str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True)
    floatlike = (stripped != units).to_numpy()
    if not floatlike.any():
        return None
    again = Assigner(experiment).assign(stripped[floatlike].tolist())
    explained = int((again == arms.to_numpy()[floatlike]).sum())
    if not explained:
        return None
    example = units[floatlike].iloc[0]
    return (f"{explained} of the {len(units)} mismatched unit ids are integers written as "
            f"floats (e.g. {example!r}); read as {stripped[floatlike].iloc[0]!r} they are in "
            "the arm logged: write the unit column as integers or text, not floats")


def _arm_summary(units: pd.DataFrame, name: str, metric: str, alpha: float) -> dict:
    z = stats.norm.ppf(1 - alpha / 2)
    if metric == "clicks_per_user":
        y = units["value"].to_numpy(float)
        value, se = float(y.mean()), float(np.sqrt(y.var(ddof=1) / len(y)))
    else:
        value, var = ratio_estimate(units["clicks"].to_numpy(float),
                                    units["impressions"].to_numpy(float))
        se = float(np.sqrt(var))
    return {"arm": name, "units": len(units), "events": int(units["events"].sum()),
            "impressions": int(units["impressions"].sum()), "clicks": int(units["clicks"].sum()),
            "value": value, "se": se, "ci_low": float(value - z * se),
            "ci_high": float(value + z * se)}
