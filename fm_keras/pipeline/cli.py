"""``fm-keras pipeline run | step | status | rollback``."""

from __future__ import annotations

import json
import sys


def add_commands(subparsers) -> dict:
    """Adds ``pipeline`` to the fm-keras subparsers; returns {name: handler}."""
    from fm_keras.pipeline.runner import STEPS

    p = subparsers.add_parser("pipeline", help="TFX-style retraining: run, step, status, rollback")
    sub = p.add_subparsers(dest="pipeline_command", required=True)
    r = sub.add_parser("run", help="run every step on the newest span (or --span)")
    r.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/demo.yaml")
    r.add_argument("--span", type=int, help="span number, the last of the run's window of "
                   "spans (data.spans; default: the newest on disk)")
    s = sub.add_parser("step", help="run one step of a run (a container step of a scheduler)")
    s.add_argument("step", choices=STEPS)
    s.add_argument("pipeline", help="pipeline YAML")
    s.add_argument("--run-id", required=True,
                   help="the run: new for the first step, then the same for the others")
    s.add_argument("--span", type=int, help="span number for a new run")
    st = sub.add_parser("status", help="runs and what serves")
    st.add_argument("pipeline", help="pipeline YAML")
    st.add_argument("--server", help="gRPC host:port of the model server to ask (GetModelStatus)")
    st.add_argument("--runs", type=int, default=10, help="how many recent runs to list")
    rb = sub.add_parser("rollback", help="serve an earlier version (or --to latest)")
    rb.add_argument("--name", required=True, help="model name, e.g. ctr (its _recall follows)")
    rb.add_argument("--to", required=True, help="version number, or 'latest' to go forward")
    rb.add_argument("--force", action="store_true",
                    help="pin the ranking model even when NAME_recall has no such version")
    where = rb.add_mutually_exclusive_group(required=True)
    where.add_argument("--pipeline", help="pipeline YAML (its pusher.model_config_file)")
    where.add_argument("--model_config_file", help="the ModelServerConfig the server polls")
    return {"pipeline": _pipeline}


def _pipeline(args) -> int:
    from fm_keras.pipeline.config import load_pipeline

    if args.pipeline_command == "rollback":
        from fm_keras.pipeline.status import rollback

        path = (args.model_config_file if args.model_config_file
                else load_pipeline(args.pipeline).pusher.model_config_file)
        result = rollback(path, args.name, args.to, force=args.force)
        for warning in result["warnings"]:
            print(f"fm-keras: pipeline: warning: {warning}", file=sys.stderr)
        print(f"fm-keras: pipeline: {', '.join(result['models'])} -> version {result['version']} "
              f"in {path}", file=sys.stderr)
        print(json.dumps(result, indent=2))
        return 0
    config = load_pipeline(args.pipeline)
    if args.pipeline_command == "status":
        from fm_keras.pipeline.status import status

        print(json.dumps(status(config, args.server, args.runs), indent=2))
        return 0
    from fm_keras.pipeline.runner import OK_STATUSES, STEPS, run_pipeline

    def print_summary(summary: dict) -> None:  # a failed run's too, then its error
        print(json.dumps(summary, indent=2), flush=True)

    if args.pipeline_command == "step":
        summary = run_pipeline(config, span=args.span, run_id=args.run_id, steps=(args.step,),
                               report=args.step == STEPS[-1], on_failure=print_summary)
        ok = summary["status"] in OK_STATUSES + ("open",)
    else:
        summary = run_pipeline(config, span=args.span, on_failure=print_summary)
        ok = summary["status"] in OK_STATUSES
    print_summary(summary)
    return 0 if ok else 1
