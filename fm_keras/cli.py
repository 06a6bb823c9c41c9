"""The `fm-keras` command line: synthetic data, training, export, serving, pipelines, A/B tests.

Errors the user can fix (bad config, bad data, unfinished runs) print one line
``fm-keras: error: ...`` and exit with status 2; results go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fm_keras import hugepages, termination
from fm_keras.experiments.cli import add_commands as _add_ab_commands
from fm_keras.pipeline.cli import add_commands as _add_pipeline_commands
from fm_keras.serving.cli import add_commands as _add_serving_commands
from fm_keras.errors import Terminated


def build_parser() -> argparse.ArgumentParser:
    """The ``fm-keras`` argument parser (every subcommand)."""
    parser = argparse.ArgumentParser(prog="fm-keras", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic CTR data set from a planted FM")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int,
                   help="total rows, 80/10/10 by time (default 1,000,000; 50,000 with --span)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--span", type=int, help="write one span of logs, OUT/span-N/part-0.csv "
                   "(same planted FM and catalog for every span), instead of train/valid/test")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="with --span: permute the clicks (a span no model can learn)")
    p.add_argument("--schema-change", action="store_true",
                   help="with --span: rename item_id to item (a breaking schema change)")

    p = sub.add_parser("train", help="train an FM from an experiment YAML")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--warm-start", "--warm_start", dest="warm_start", metavar="RUN",
                   help="start from the weights and fitted features of a finished run with the "
                        "same features and model sections (e.g. yesterday's model on today's "
                        "data); the optimizer starts afresh")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    p = sub.add_parser("tune", help="hyperparameter search (Optuna) over train; a study on an "
                       "RDB storage is shared by every process that names it")
    p.add_argument("--config", required=True, help="experiment YAML to tune")
    p.add_argument("--trials", type=int, required=True, help="trials this process runs")
    p.add_argument("--storage", help="Optuna storage URL shared by processes, e.g. "
                   "sqlite:///tune.db (default: in memory)")
    p.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    p.add_argument("--out", help="tune directory (default: tune/<config name>-<time>)")
    p.add_argument("--study_name", "--study-name", help="default: the config file's name")
    p.add_argument("--search_space", "--search-space", metavar="FILE",
                   help="YAML replacing keys of the default search space (see README)")
    p.add_argument("--seed", type=int, help="sampler seed (default: a fresh one per process)")

    p = sub.add_parser("convert", help="encode CSV/Parquet/libSVM/libFFM logs once into a "
                       "shard directory that one machine (out of core) and a cluster train from")
    p.add_argument("--config", required=True, help="experiment YAML (feature spec, label, filters)")
    p.add_argument("--input", nargs="+", help="CSV/Parquet/libSVM/libFFM files or globs "
                   "(default: the experiment's train files)")
    p.add_argument("--out", required=True, help="new directory for the shards (then set "
                   "data: train: OUT/shards.json)")
    p.add_argument("--shards", type=int, default=8,
                   help="number of files (at least the number of synchronous workers)")

    p = sub.add_parser("cluster-server", help="run TensorFlow's server for this worker/ps task "
                       "of TF_CONFIG (parameter-server training)")

    p = sub.add_parser("evaluate", help="metrics of a finished run on labeled data, as JSON")
    p.add_argument("--run", required=True, help="run directory written by 'fm-keras train'")
    p.add_argument("--data", required=True, nargs="+",
                   help="CSV/Parquet/libSVM/libFFM files or globs")
    p.add_argument("--reliability_plot", "--reliability-plot", metavar="PATH",
                   help="also write a reliability diagram (PNG) of the probabilities here")
    p.add_argument("--items", help="item catalog: report Recall@K, NDCG@K, HitRate@K and "
                   "coverage over it (exact search) beside the popularity baseline (default "
                   "for a retrieval run: its data.items)")
    p.add_argument("--recall_at", help="comma-separated K values (default 10,50,100); a CTR "
                   "run needs --items for them")
    p.add_argument("--exclude", nargs="+", action="extend", help="logs whose (user, item) "
                   "pairs are not recommended, e.g. the training log (several files, or the "
                   "flag repeated: all are used)")

    p = sub.add_parser("export", help="export a finished run as a versioned ranking SavedModel")
    p.add_argument("--run", required=True, help="run directory written by 'fm-keras train'")
    p.add_argument("--name", required=True, help="model name: writes BASE/NAME/<version>")
    p.add_argument("--base", default="saved_models", help="model base directory")
    p.add_argument("--version", type=int, help="version number (default: the next one)")

    p = sub.add_parser("index", help="build a recall model (ScaNN, partitioned or brute force) over a catalog")
    p.add_argument("--model", required=True, help="ranking export: saved_models/NAME[/V]")
    p.add_argument("--items", required=True, help="item catalog (CSV/Parquet) with item features")
    p.add_argument("--name", required=True, help="recall model name, e.g. NAME_recall")
    p.add_argument("--base", default="saved_models", help="model base directory")
    p.add_argument("--k", type=int, default=100, help="items returned per user")
    p.add_argument("--backend", choices=("scann", "brute_force", "partitioned"),
                   default="scann", help="scann (needs ScaNN-enabled TF Serving), partitioned "
                   "(IVF with stock ops: any TF Serving) or brute_force (stock ops, exact)")
    p.add_argument("--partitions", type=int, help="k-means partitions (ScaNN: num_leaves; "
                   "default: sized by catalog)")
    p.add_argument("--partitions-to-search", type=int,
                   help="partitions searched per query (ScaNN: leaves_to_search)")
    p.add_argument("--rescore", type=int, help="candidates re-scored exactly (ScaNN: reorder; "
                   "partitioned: the int8 shortlist)")
    p.add_argument("--quantize", choices=("int8",), help="partitioned: int8 blocks")
    p.add_argument("--id-column", default="item_id", help="catalog column with the item id")
    p.add_argument("--version", type=int, help="version number (default: the next one)")

    p = sub.add_parser("score", help="batch-score CSV/Parquet files with an export's signature")
    p.add_argument("--model", required=True, help="export: saved_models/NAME[/V]")
    p.add_argument("--input", required=True, nargs="+",
                   help="CSV/Parquet/libSVM/libFFM files or globs")
    p.add_argument("--output", required=True, help="output file (.csv or .parquet)")
    p.add_argument("--signature", default="serving_default",
                   help="serving_default, user_tower, item_tower, ...")
    p.add_argument("--runner", help="score on Apache Beam with this runner (DirectRunner, "
                   "DataflowRunner, FlinkRunner, SparkRunner); needs fm-keras[beam]")
    p.add_argument("--beam_option", action="append", default=[], metavar="KEY=VALUE",
                   help="a Beam pipeline option, e.g. project=my-proj (repeatable)")
    p.add_argument("--batch-size", type=int, default=16_384, help="rows per signature call")
    p.add_argument("--keep", help="comma-separated input columns to copy to the output "
                   "(default: id columns: 'id' and *_id)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("recommend", help="top-K items for a file of users with a recall export")
    p.add_argument("--model", required=True, help="recall export: saved_models/NAME_recall[/V]")
    p.add_argument("--users", required=True, nargs="+", help="CSV/Parquet of user features")
    p.add_argument("--k", type=int, default=10, help="items per user (at most the index's k)")
    p.add_argument("--output", required=True, help="output file (.csv or .parquet)")
    p.add_argument("--exclude-column", help="column of '|'-separated item ids to leave out")
    p.add_argument("--keep", help="comma-separated user columns to copy (default: id columns)")
    p.add_argument("--batch-size", type=int, default=4096,
                   help="users per signature call (with --exclude-column also at most ~4 MiB "
                        "of the file, the first batch half that, and ~16 MiB of padded lists)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    _COMMANDS.update(_add_serving_commands(sub))  # serve, query
    _COMMANDS.update(_add_pipeline_commands(sub))  # pipeline run | step | status | rollback
    _COMMANDS.update(_add_ab_commands(sub))  # ab report | simulate | assign
    return parser


def _trains(args) -> bool:
    """Whether the command holds training tables (and so wants transparent huge pages)."""
    return args.command in ("train", "tune", "cluster-server") or (
        args.command == "pipeline" and args.pipeline_command in ("run", "step"))


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit status: 0, 2 for bad input (one line on stderr), 130 on SIGINT,
    143 on SIGTERM (what Kubernetes, Airflow and `timeout` send to stop a job) before the
    command's output is in place; a SIGTERM after that (``fm_keras.termination``) changes
    nothing: exit 0. 141 (128 + SIGPIPE, as a shell tool killed by it) when stdout is a pipe
    that its reader closed (``fm-keras ... | head -1``): nothing more is printed, no traceback;
    the command's work (files written, a pipeline run) is done as far as it had got.

    Args:
        argv: the arguments; None reads ``sys.argv``, as the ``fm-keras`` program does. Then
            the program restarts itself once with transparent huge pages before a command
            that trains (`fm_keras.hugepages`), and,
            after a command that committed its output, SIGTERM stays ignored while the process
            exits (unloading TensorFlow takes a while, and the default action would kill a
            finished job with 143); a caller that passes ``argv`` gets its handler back.
    """
    import signal
    import threading

    args = build_parser().parse_args(argv)
    if argv is None and _trains(args):
        hugepages.reexec_with_tunable()  # returns where it changes nothing
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tf_log_level())
    from fm_keras.errors import FMKerasError

    termination.reset()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, termination.on_sigterm) if main_thread else None
    try:
        code = _COMMANDS[args.command](args)
        if sys.stdout is not None:  # None: the descriptor was closed (`>&-`)
            sys.stdout.flush()  # here, not at exit, where a closed pipe is "Exception ignored"
        return code
    except BrokenPipeError:
        closed = [stream for stream in (sys.stdout, sys.stderr) if reader_gone(stream)]
        if not closed:
            raise  # another pipe or socket (e.g. to a model server): a real error
        # The Python docs' recipe (library/signal.html, "Note on SIGPIPE"): the stream to
        # devnull, so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in closed:
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except FMKerasError as err:
        print(f"fm-keras: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fm-keras: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("fm-keras: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main_thread and argv is None and termination.committed():
            # CPython's finalization puts a Python handler back to the default action, which
            # would kill the finished job (143) while TensorFlow unloads; SIG_IGN it keeps.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif main_thread:
            signal.signal(signal.SIGTERM, previous)


def reader_gone(stream) -> bool:
    """Whether `stream` (sys.stdout, sys.stderr) is a pipe whose reader has gone: poll reports
    an error on it. Where poll is not available, True for stdout (a BrokenPipeError is then
    taken to be stdout's), False for the others."""
    import select

    if not hasattr(select, "poll"):
        return stream is sys.stdout
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # the stream replaced (tests) or closed
        return False


def tf_log_level() -> str:
    """TensorFlow's C++ log level for the commands: errors only, none without a GPU.

    The pip TensorFlow build looks for CUDA at start and, on a machine without an NVIDIA
    device, logs "failed call to cuInit ... CUDA error" at ERROR level from C++. Level 3 hides
    it there; a GPU machine keeps level 2 (its CUDA errors are real). A failing op still
    raises its error in Python either way. An explicit TF_CPP_MIN_LOG_LEVEL wins.
    """
    import glob

    has_gpu = bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")
    return "2" if has_gpu else "3"


def _synth(args) -> int:
    from fm_keras.errors import ConfigError
    from fm_keras.synth import generate, generate_span

    if args.span is not None:
        rows = args.rows or 50_000
        out = generate_span(args.out, args.span, rows=rows, seed=args.seed,
                            shuffle_labels=args.shuffle_labels, schema_change=args.schema_change)
        print(f"fm-keras: wrote span {args.span} ({rows:,} rows) to {out}", file=sys.stderr)
        print(json.dumps({"out": out, "span": args.span, "rows": rows}, indent=2))
        return 0
    if args.shuffle_labels or args.schema_change:
        raise ConfigError("--shuffle-labels and --schema-change need --span")
    rows = args.rows or 1_000_000
    oracle = generate(args.out, rows=rows, seed=args.seed)
    print(f"fm-keras: wrote {rows:,} synthetic rows to {args.out}", file=sys.stderr)
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
    record = train(config, out, resume=args.resume, verbose=0 if args.quiet else None,
                   warm_start=args.warm_start)
    if record is None:  # a non-chief task of a cluster: the chief reports the run
        return 0
    print(json.dumps({"run": out, "best_epoch": record["best_epoch"],
                      "converged": record.get("converged", True), "metrics": record["metrics"]}, indent=2))
    return 0


def _tune(args) -> int:
    import time

    from fm_keras.config import load_experiment
    from fm_keras.search_space import load_search_space
    from fm_keras.tune import tune

    config = load_experiment(args.config)
    space = load_search_space(args.search_space, config)
    stem = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join("tune", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(json.dumps(tune(config, out, args.trials, storage=args.storage, timeout=args.timeout,
                          study_name=args.study_name, space=space, seed=args.seed), indent=2))
    return 0


def _convert(args) -> int:
    from fm_keras.config import load_experiment
    from fm_keras.convert import convert

    config = load_experiment(args.config)
    manifest = convert(config, args.input or list(config.data.train), args.out, args.shards)
    print(json.dumps({"out": args.out, "train": os.path.join(args.out, "shards.json"),
                      "rows": manifest["rows"], "rows_read": manifest["rows_read"],
                      "shards": len(manifest["files"]), "dropped": manifest["dropped"]},
                     indent=2))
    return 0


def _cluster_server(args) -> int:
    from fm_keras.distributed import run_server

    run_server()
    return 0


def _evaluate(args) -> int:
    from fm_keras.errors import ConfigError
    from fm_keras.evaluation import evaluate_run
    from fm_keras.fsutil import read_json

    run_json = os.path.join(args.run, "run.json")
    retrieval = os.path.exists(run_json) and read_json(run_json).get("task") == "retrieval"
    recall = bool(args.items or retrieval or args.exclude)
    if recall and args.reliability_plot:
        raise ConfigError("--reliability_plot: the diagram is of click probabilities, not drawn "
                          "with Recall@K (--items, --exclude or a retrieval run); evaluate "
                          "without them for it")
    if not recall and args.recall_at is not None:
        raise ConfigError("--recall_at: Recall@K of a CTR run is over a catalog; pass --items")
    if recall:
        from fm_keras.retrieval import evaluate_recall

        recall_at = args.recall_at or "10,50,100"
        try:
            ks = [int(k) for k in recall_at.split(",") if k.strip()]
        except ValueError:
            ks = []
        if not ks or min(ks) < 1:
            raise ConfigError(f"--recall_at: expected positive integers like 10,50,100, "
                              f"got {recall_at!r}")
        print(json.dumps(evaluate_recall(args.run, args.data, args.items, ks, args.exclude),
                         indent=2))
        return 0
    print(json.dumps(evaluate_run(args.run, args.data,
                                  reliability_plot=args.reliability_plot), indent=2))
    return 0


def _export(args) -> int:
    from fm_keras.export import export_run

    path = export_run(args.run, args.name, base=args.base, version=args.version)
    print(json.dumps({"model": path}, indent=2))
    return 0


def _index(args) -> int:
    from fm_keras.recall import build_index

    settings = {"partitions": args.partitions, "partitions_to_search": args.partitions_to_search,
                "rescore": args.rescore, "quantize": args.quantize}
    path = build_index(args.model, args.items, args.name, base=args.base, k=args.k,
                       backend=args.backend, id_column=args.id_column, version=args.version,
                       settings={k: v for k, v in settings.items() if v is not None})
    print(json.dumps({"model": path}, indent=2))
    return 0


def _score(args) -> int:
    from fm_keras.scoring import run_signature

    if args.runner:
        from fm_keras.beam_scoring import score_with_beam

        print(json.dumps(score_with_beam(
            args.model, args.input, args.output, runner=args.runner,
            signature=args.signature, batch_size=args.batch_size, keep=_columns(args.keep),
            options=args.beam_option), indent=2))
        return 0
    print(json.dumps(run_signature(args.model, args.input, args.output,
                                   signature=args.signature, batch_size=args.batch_size,
                                   keep=_columns(args.keep), progress=not args.quiet), indent=2))
    return 0


def _recommend(args) -> int:
    from fm_keras.scoring import recommend

    print(json.dumps(recommend(args.model, args.users, args.output, args.k,
                               exclude_column=args.exclude_column, keep=_columns(args.keep),
                               batch_size=args.batch_size, progress=not args.quiet), indent=2))
    return 0


def _columns(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


_COMMANDS = {"synth": _synth, "train": _train, "tune": _tune, "convert": _convert,
             "cluster-server": _cluster_server, "evaluate": _evaluate, "export": _export,
             "index": _index, "score": _score, "recommend": _recommend}

if __name__ == "__main__":
    sys.exit(main())
