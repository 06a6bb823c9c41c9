"""``fm-keras ab report | simulate | assign`` (docs/experiments.md)."""

from __future__ import annotations

import json
import math
import os
import sys


SIMULATION_FILES = ("events.parquet", "report.html")  # all that `ab simulate --out` holds


def add_commands(subparsers) -> dict:
    """Adds ``ab`` to the fm-keras subparsers; returns {name: handler}."""
    p = subparsers.add_parser("ab", help="A/B experiments between model versions: report, "
                              "simulate, assign")
    sub = p.add_subparsers(dest="ab_command", required=True)

    r = sub.add_parser("report", help="per-arm means, lift with a 95%% CI, p-value, SRM check")
    _experiment_args(r)
    r.add_argument("--events", required=True, nargs="+", help="event CSV/Parquet files or globs")
    _analysis_args(r)
    r.add_argument("--html", help="write the report page (PNG plots embedded) here")

    s = sub.add_parser("simulate", help="simulate the experiment on 'fm-keras synth' users with "
                       "the arms' exports; clicks from the planted FM; then report")
    _experiment_args(s)
    s.add_argument("--data", required=True, help="'fm-keras synth' output directory")
    s.add_argument("--out", required=True, help="new directory (or a previous simulation's, which is "
                   "replaced): events.parquet, report.html")
    s.add_argument("--users", type=int, help="units in the experiment (default: all users)")
    s.add_argument("--sessions", type=float, default=3.0, help="mean requests per user before the heaviest users are capped (3 gives ~2.4)")
    s.add_argument("--slate", type=int, default=10, help="items shown per request")
    s.add_argument("--candidates", type=int, default=100,
                   help="items recalled and re-ranked per request (at most the index's k)")
    s.add_argument("--days", type=int, default=14, help="experiment length in days")
    s.add_argument("--no-pre-period", action="store_true",
                   help="do not log the pre-period clicks (no CUPED covariate)")
    s.add_argument("--no-true-lift", action="store_true",
                   help="skip serving the pre-period requests with the other arms (the true "
                   "lift)")
    s.add_argument("--seed", type=int, default=0)
    _analysis_args(s)

    a = sub.add_parser("assign", help="the arm of every unit in a file (offline assignment)")
    _experiment_args(a)
    a.add_argument("--users", required=True, nargs="+",
                   help="CSV/Parquet files or globs with the experiment's unit column")
    a.add_argument("--output", required=True, help="output .csv or .parquet: unit, bucket, arm")
    return {"ab": _ab}


def _experiment_args(p) -> None:
    p.add_argument("--experiment", required=True, help="A/B experiment YAML")
    p.add_argument("--base", help="model base directory holding the arms' versions "
                   "(overrides the file's base)")
    p.add_argument("--model_config_file", help="the server's ModelServerConfig, where version "
                   "labels are defined (overrides the file's)")


def _analysis_args(p) -> None:
    from fm_keras.experiments.config import METRICS

    p.add_argument("--metric", choices=METRICS, default="clicks_per_user")
    p.add_argument("--cuped", action="store_true",
                   help="CUPED variance reduction with the events' pre_period column")


def _ab(args) -> int:
    from fm_keras.experiments.config import load_ab_experiment

    experiment = load_ab_experiment(args.experiment, base=args.base,
                                    model_config_file=args.model_config_file)
    if args.ab_command == "assign":
        from fm_keras.experiments.assignment import assign_file

        print(json.dumps(assign_file(experiment, args.users, args.output), indent=2,
                         allow_nan=False))
        return 0
    from fm_keras.experiments.report import ab_report, summary_line

    if args.ab_command == "report":
        result = ab_report(args.events, experiment, metric=args.metric, cuped=args.cuped,
                           html_path=args.html)
    else:
        result = _simulate(args, experiment)
    for line in summary_line(result).splitlines():  # one line per comparison
        print(f"fm-keras: {line}", file=sys.stderr)
    for arm, lift in result.get("simulation", {}).get("true_lift", {}).items():
        print(f"fm-keras: true lift of {arm} (planted FM, expected clicks on the same "
              f"requests): {lift:+.2%}", file=sys.stderr)
    print(json.dumps(_finite(result), indent=2, allow_nan=False))
    return 0


def _finite(value):
    """The result with NaN/inf floats (undefined statistics) as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _simulate(args, experiment) -> dict:
    from fm_keras import fsutil
    from fm_keras.errors import ConfigError
    from fm_keras.experiments.report import ab_report
    from fm_keras.experiments.simulate import SimulationSpec, simulate

    spec = SimulationSpec(users=args.users, sessions=args.sessions, slate=args.slate,
                          candidates=args.candidates, days=args.days,
                          pre_period=not args.no_pre_period, true_lift=not args.no_true_lift,
                          seed=args.seed)
    if args.cuped and args.no_pre_period:
        raise ConfigError("--cuped needs the pre-period: drop --no-pre-period")
    # --out is replaced as a whole: it may only be new or a previous simulation's output.
    if os.path.isfile(args.out):
        raise ConfigError(f"{args.out}: --out: is a file; give a new directory")
    others = sorted(set(os.listdir(args.out)) - set(SIMULATION_FILES)) \
        if os.path.isdir(args.out) else []
    if others:
        raise ConfigError(f"{args.out}: --out: holds {others[:5]}, which the simulation would "
                          f"delete (it replaces the directory with {list(SIMULATION_FILES)}); "
                          "give a new directory")
    with fsutil.atomic_dir(args.out) as tmp:
        events = os.path.join(tmp, "events.parquet")
        simulation = simulate(experiment, args.data, events, spec,
                              name=os.path.join(args.out, "events.parquet"))
        result = ab_report([events], experiment, metric=args.metric, cuped=args.cuped,
                           html_path=os.path.join(tmp, "report.html"))
    result.update(events=[simulation["events"]], html=os.path.join(args.out, "report.html"),
                  simulation=simulation)
    return result
