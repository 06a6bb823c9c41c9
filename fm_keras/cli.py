"""The `fm-keras` command line: synth, train, evaluate.

Errors the user can fix (bad config, bad data, unfinished runs) print one line
``fm-keras: error: ...`` and exit with status 2; results go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm-keras", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic CTR data set from a planted FM")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int, default=1_000_000, help="total rows (80/10/10 by time)")
    p.add_argument("--seed", type=int, default=7)

    p = sub.add_parser("train", help="train an FM from an experiment YAML")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    p = sub.add_parser("evaluate", help="metrics of a finished run on labeled data, as JSON")
    p.add_argument("--run", required=True, help="run directory written by 'fm-keras train'")
    p.add_argument("--data", required=True, nargs="+", help="CSV/Parquet files or globs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fm_keras.errors import FMKerasError

    try:
        return _COMMANDS[args.command](args)
    except FMKerasError as err:
        print(f"fm-keras: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fm-keras: interrupted", file=sys.stderr)
        return 130


def _synth(args) -> int:
    from fm_keras.synth import generate

    oracle = generate(args.out, rows=args.rows, seed=args.seed)
    print(f"fm-keras: wrote {args.rows:,} synthetic rows to {args.out}", file=sys.stderr)
    print(json.dumps({"out": args.out, "oracle_auc": oracle["auc"],
                      "oracle_logloss": oracle["logloss"],
                      "positive_rate": oracle["positive_rate"]}, indent=2))
    return 0


def _train(args) -> int:
    import time

    from fm_keras.config import load_experiment
    from fm_keras.training import train

    config = load_experiment(args.config)
    out = args.out or os.path.join(
        "runs", f"{os.path.splitext(os.path.basename(args.config))[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = train(config, out, resume=args.resume, verbose=0 if args.quiet else None)
    print(json.dumps({"run": out, "best_epoch": record["best_epoch"] + 1,
                      "metrics": record["metrics"]}, indent=2))
    return 0


def _evaluate(args) -> int:
    from fm_keras.evaluation import evaluate_run

    print(json.dumps(evaluate_run(args.run, args.data), indent=2))
    return 0


_COMMANDS = {"synth": _synth, "train": _train, "evaluate": _evaluate}

if __name__ == "__main__":
    sys.exit(main())
