"""A/B analysis on per-unit totals: means, relative lift with a CI, Welch p-value, SRM, CUPED.

Metrics (the unit is the randomization unit, e.g. the user):

- ``clicks_per_user``: the mean over units of each unit's clicks. Welch's t-test (statsmodels
  ``CompareMeans``, unequal variances, Welch-Satterthwaite df) gives the p-value and the CI of
  the difference.
- ``ctr``: sum of clicks / sum of impressions per arm, a ratio of two per-unit means. Units,
  not impressions, are independent, so its variance is the delta method's
  ``Var(Ybar/Xbar) ~ (s_Y^2 - 2 R s_XY + R^2 s_X^2) / (n Xbar^2)`` (Deng, Knoblich and Lu 2018,
  "Applying the Delta Method in Metric Analytics", KDD, section 3); the p-value is a z-test on
  the difference of the two ratios.

The relative lift ``m_t / m_c - 1`` gets Fieller's CI (Fieller 1954, "Some Problems in Interval
Estimation", JRSS B 16): the set of ratios r with ``|m_t - r m_c| <= q sqrt(V_t + r^2 V_c)``,
q the critical value of the arm test itself (Welch's t quantile, or z for ctr). At r = 1 the
inequality is that test's statistic, so the CI holds 0% lift exactly when p >= alpha; a
delta-method interval (symmetric around the estimate) does not, and under-covers with
heavy-tailed units or small arms. When the control mean is not distinguishable from 0
(``m_c^2 <= q^2 V_c``) the set is unbounded and the bounds are NaN (JSON null) with a note.
With several treatments, Holm's step-down adjustment (Holm 1979, "A Simple Sequentially
Rejective Multiple Test Procedure", Scand. J. Statistics 6) controls the family-wise error of
the treatment-vs-control p-values; the CIs stay per comparison (unadjusted).

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
# Below this many units in an arm the normal/t approximations of the CIs and p-values (means
# of heavy-tailed counts, the delta method's linearization of ctr) can be far off: in a trial
# with lognormal(0, 1.5) user activity, ctr's A/A test rejected 12% of the time at 200 users.
MIN_UNITS = 100


def relative_lift(mean_t: float, var_t: float, mean_c: float, var_c: float,
                  alpha: float = 0.05, df: float | None = None) -> dict:
    """``mean_t / mean_c - 1`` with Fieller's CI (Fieller 1954) for independent arms.

    The CI is ``{r - 1 : (mean_t - r mean_c)^2 <= q^2 (var_t + r^2 var_c)}``, q the two-sided
    ``1 - alpha`` quantile of Student's t with `df` degrees of freedom (z when df is None):
    the roots of ``a r^2 - 2 b r + c = 0`` with ``a = mean_c^2 - q^2 var_c``,
    ``b = mean_t mean_c``, ``c = mean_t^2 - q^2 var_t``. It is bounded only when ``a > 0``
    (the control mean differs from 0 at level alpha); otherwise the set is the whole line or
    the complement of an interval, and the bounds are NaN.

    Args:
        mean_t, mean_c: the treatment and control estimates (e.g. sample means).
        var_t, var_c: the variances of those estimates (e.g. s^2 / n).
        alpha: 1 - confidence level.
        df: the degrees of freedom of the arm test (Welch-Satterthwaite), or None for z.

    Returns:
        ``{"lift", "ci_low", "ci_high", "se", "ci_bounded"}`` (fractions: 0.05 is +5%); ``se``
        is the delta-method standard error of the lift (Deng et al. 2018), descriptive only,
        NaN when the CI is unbounded.
    """
    q = float(stats.norm.ppf(1 - alpha / 2) if df is None else stats.t.ppf(1 - alpha / 2, df))
    var_t, var_c = max(float(var_t), 0.0), max(float(var_c), 0.0)
    lift = mean_t / mean_c - 1.0 if mean_c != 0 else float("nan")
    a = mean_c**2 - q**2 * var_c
    if not a > 0:
        return {"lift": float(lift), "ci_low": float("nan"), "ci_high": float("nan"),
                "se": float("nan"), "ci_bounded": False}
    b = mean_t * mean_c
    # b^2 - a c = q^2 (mean_t^2 var_c + var_t a) >= 0 when a > 0: two real roots.
    root = q * np.sqrt(mean_t**2 * var_c + var_t * a)
    se = float(np.sqrt(var_t / mean_c**2 + mean_t**2 * var_c / mean_c**4))
    return {"lift": float(lift), "ci_low": float((b - root) / a - 1.0),
            "ci_high": float((b + root) / a - 1.0), "se": se, "ci_bounded": True}


def _dropped_from(table: pd.DataFrame, several: pd.Series, arm: str) -> str:
    """Why an arm is small when units logged in several arms (dropped) are the cause: how many
    were dropped, how many from `arm`, and one with its arms; "" when none came from it."""
    lost = table.loc[several & (table["arm"] == arm), "unit"]
    if lost.empty:
        return ""
    example = lost.iloc[0]
    arms = sorted(table.loc[table["unit"] == example, "arm"])
    dropped = table.loc[several, "unit"].nunique()
    return (f" once the units logged in several arms are dropped: {dropped} unit"
            f"{'s' if dropped != 1 else ''} dropped ({len(lost)} logged in {arm!r}), e.g. "
            f"{example!r} in {arms}; log each unit in the arm its id assigns")


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    ``p_(i)`` sorted ascending becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; NaN
    p-values (undefined tests) stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        out[index] = running
    return [float(v) for v in out]


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
        ``{"difference", "ci_low", "ci_high", "p_value", "t", "df"}`` of the absolute
        difference; df is Welch-Satterthwaite's.
    """
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    compare = CompareMeans(DescrStatsW(y_t), DescrStatsW(y_c))
    t, p, df = compare.ttest_ind(usevar="unequal")
    low, high = compare.tconfint_diff(alpha=alpha, usevar="unequal")
    return {"difference": float(np.mean(y_t) - np.mean(y_c)), "ci_low": float(low),
            "ci_high": float(high), "p_value": float(p), "t": float(t), "df": float(df)}


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
        "difference_ci", "test", "notes"}``; the lift CI is Fieller's with the test's own
        critical value (Welch's t quantile, or z for ctr), so it holds 0 exactly when
        ``p_value >= alpha``. When both arms have no variance (constant per-unit metric) the
        p-value and both CIs are NaN; when the CI is unbounded its bounds are NaN; ``notes``
        says which.
    """
    t, c = units[units["arm"] == treatment], units[units["arm"] == control]
    if metric == "clicks_per_user":
        y_t, y_c = t["value"].to_numpy(float), c["value"].to_numpy(float)
        m_t, v_t, m_c, v_c = y_t.mean(), y_t.var(ddof=1) / len(y_t), y_c.mean(), \
            y_c.var(ddof=1) / len(y_c)
        test = welch(y_t, y_c, alpha)
        out = {"p_value": test["p_value"], "difference": test["difference"],
               "difference_ci": [test["ci_low"], test["ci_high"]], "test": "welch"}
        df = test["df"]
    else:
        m_t, v_t = ratio_estimate(t["clicks"].to_numpy(float), t["impressions"].to_numpy(float))
        m_c, v_c = ratio_estimate(c["clicks"].to_numpy(float), c["impressions"].to_numpy(float))
        z = (m_t - m_c) / np.sqrt(v_t + v_c)
        half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(v_t + v_c)
        out = {"p_value": float(2 * stats.norm.sf(abs(z))), "difference": float(m_t - m_c),
               "difference_ci": [float(m_t - m_c - half), float(m_t - m_c + half)],
               "test": "delta-method z"}
        df = None
    lift = relative_lift(m_t, v_t, m_c, v_c, alpha, df=df)
    notes = []
    if _no_variance(v_t, m_t) and _no_variance(v_c, m_c):
        nan = float("nan")
        out.update(p_value=nan, difference_ci=[nan, nan])
        lift.update(ci_low=nan, ci_high=nan, se=nan)
        notes.append("p-value and CIs undefined: both arms are constant (no variance)")
    elif not lift["ci_bounded"]:
        notes.append("lift CI unbounded: the control mean is not distinguishable from 0")
    del lift["ci_bounded"]
    return {"arm": treatment, **lift, **out, "notes": notes}


def _no_variance(var: float, mean: float) -> bool:
    """Whether an estimate's variance is 0 up to rounding (ctr's delta-method variance of a
    constant per-unit ratio is 0 only up to floating-point error)."""
    return not var > (1e-10 * abs(mean)) ** 2


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
        A JSON-ready dict: arms, comparisons against control (with ``p_value_holm``), notes,
        warnings (arms under ``MIN_UNITS`` units), srm, checks, trustworthy. Each arm's
        ``value`` is the metric analyzed (CUPED-adjusted with ``cuped``), ``value_raw`` the
        unadjusted one and ``adjustment`` ``"cuped"`` or None.

    Raises:
        ConfigError: an unknown metric, or CUPED with ``ctr``.
        DataError: an arm without events or with fewer than 2 units, ``ctr`` with an arm
            without impressions, or CUPED without a pre_period column.

    A statistic that is undefined on valid data (the lift over a control whose mean is 0, the
    p-value and CIs of two constant arms, the bounds of an unbounded lift CI) is NaN, with a
    note in the comparison's ``notes``; ``fm-keras ab`` prints it as JSON ``null``.
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
            raise DataError(f"{source}: arm {name!r} has events of only {len(arm_units)} unit"
                            f"{_dropped_from(table, arms_of_unit > 1, name)}; a variance needs "
                            "at least 2 units per arm")
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
    units["value_raw"] = units["value"]
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
        arms = [_arm_summary(units[units["arm"] == a], a, metric, alpha, cuped)
                for a in experiment.arm_names]
        comparisons = [compare_arms(units, a, experiment.control, metric, alpha)
                       for a in experiment.arm_names if a != experiment.control]
    for comparison, adjusted in zip(comparisons, holm([c["p_value"] for c in comparisons])):
        comparison["p_value_holm"] = adjusted
    notes = []
    if len(comparisons) >= 2:
        notes.append(f"p_value_holm: Holm-adjusted over the {len(comparisons)} comparisons "
                     f"with {experiment.control!r} (family-wise error <= {alpha}); the CIs are "
                     "per comparison, not adjusted")
    warnings = [f"arm {a['arm']!r} has {a['units']} units (< {MIN_UNITS}): the normal "
                "approximations behind its CIs and p-values may be poor"
                for a in arms if a["units"] < MIN_UNITS]
    checks = {"units_in_several_arms": contaminated, "assignment_mismatches": mismatches,
              "assignment_hint": hint}
    trustworthy = not srm["flagged"] and contaminated == 0 and not mismatches
    return {"experiment": experiment.name, "metric": metric, "cuped": cuped_info,
            "alpha": alpha, "control": experiment.control, "arms": arms,
            "comparisons": comparisons, "notes": notes, "warnings": warnings, "srm": srm,
            "checks": checks, "trustworthy": trustworthy}


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


def _arm_summary(units: pd.DataFrame, name: str, metric: str, alpha: float,
                 cuped: bool) -> dict:
    z = stats.norm.ppf(1 - alpha / 2)
    if metric == "clicks_per_user":
        y = units["value"].to_numpy(float)
        value, se = float(y.mean()), float(np.sqrt(y.var(ddof=1) / len(y)))
        raw = float(units["value_raw"].mean())
    else:
        value, var = ratio_estimate(units["clicks"].to_numpy(float),
                                    units["impressions"].to_numpy(float))
        se, raw = float(np.sqrt(max(var, 0.0))), value
    return {"arm": name, "units": len(units), "events": int(units["events"].sum()),
            "impressions": int(units["impressions"].sum()), "clicks": int(units["clicks"].sum()),
            "value": value, "value_raw": raw, "adjustment": "cuped" if cuped else None,
            "se": se, "ci_low": float(value - z * se), "ci_high": float(value + z * se)}
