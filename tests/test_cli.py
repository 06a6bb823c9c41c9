"""The fm-keras command: one-line errors with exit status 2, and synth -> train -> evaluate."""

import json
import os
import subprocess
import sys

import pytest

from fm_keras.cli import build_parser, main


def _short_experiment(synth_dir, tmp_path, epochs):
    """synth's experiment with absolute paths, a few epochs, small batches and big steps
    (20k rows: a model that learns something in one or two epochs)."""
    config = tmp_path / "exp.yaml"
    config.write_text((synth_dir / "experiment.yaml").read_text()
                      .replace("features: features.yaml", "features: features.yaml\n"
                               f"training: {{epochs: {epochs}, batch_size: 1024, learning_rate: 0.02}}")
                      .replace("train.csv", str(synth_dir / "train.csv"))
                      .replace("valid.csv", str(synth_dir / "valid.csv"))
                      .replace("test.csv", str(synth_dir / "test.csv"))
                      .replace("features.yaml", str(synth_dir / "features.yaml")))
    return config


def test_train_and_evaluate_print_json(small_synth, tmp_path, capsys):
    synth_dir, _ = small_synth
    run_dir = str(tmp_path / "run")
    config = _short_experiment(synth_dir, tmp_path, epochs=1)
    assert main(["train", "--config", str(config), "--out", run_dir, "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["run"] == run_dir
    assert main(["evaluate", "--run", run_dir, "--data", str(synth_dir / "test.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    # Near-tied scores of a barely trained model can swap under float noise: 1e-5, not exact.
    assert result["auc"] == pytest.approx(trained["metrics"]["test"]["auc"], abs=1e-5)
    assert {"logloss", "mean_predicted", "observed_rate", "ece", "rows", "dropped"} <= set(result)
    plot = tmp_path / "reliability.png"
    assert main(["evaluate", "--run", run_dir, "--data", str(synth_dir / "test.csv"),
                 "--reliability_plot", str(plot)]) == 0
    assert json.loads(capsys.readouterr().out)["reliability_plot"] == str(plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    missing = tmp_path / "no-such-dir" / "r.png"
    assert main(["evaluate", "--run", run_dir, "--data", str(synth_dir / "test.csv"),
                 "--reliability_plot", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--reliability_plot: its directory does not exist" in err and len(err.splitlines()) == 1
    assert not missing.parent.exists()
    text = tmp_path / "r.txt"
    assert main(["evaluate", "--run", run_dir, "--data", str(synth_dir / "test.csv"),
                 "--reliability_plot", str(text)]) == 2
    err = capsys.readouterr().err
    assert "the diagram is a PNG; name the file *.png" in err and len(err.splitlines()) == 1
    assert not text.exists()
    # --warm-start: from the finished run; from a directory that is not one, a one-line error
    warm = str(tmp_path / "warm")
    assert main(["train", "--config", str(config), "--out", warm, "--quiet",
                 "--warm-start", run_dir]) == 0
    assert f"warm start from {run_dir}" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "cold"), "--quiet",
                 "--warm_start", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"fm-keras: error: {tmp_path}: cannot warm-start from it: " \
        "not a finished run" and err.count("error") == 1
    assert not (tmp_path / "cold").exists()


def _corrupted(data: bytes) -> bytes:
    """A CSV file's bytes with line 1234's second cell starting with 0xff, cut mid-row."""
    lines = data.split(b"\n")
    lines[1233] = lines[1233].replace(b",", b",\xff", 1)
    return b"\n".join(lines)[:-(len(lines[-2]) // 2 + 1)]


_BAD_INPUTS = [
    (lambda d: (d / "features.yaml").write_text(
        (d / "features.yaml").read_text().replace("kind: numeric", "kind: numerc")),
     "features.yaml: feature 'item_price': kind must be one of"),
    (lambda d: (d / "experiment.yaml").write_text(
        (d / "experiment.yaml").read_text().replace("label: click", "lable: click")),
     "experiment.yaml: data: unknown key 'lable' (did you mean 'label'?)"),
    (lambda d: (d / "train.csv").write_text(
        (d / "train.csv").read_text().replace("item_price", "price", 1)),
     "train.csv: missing column 'item_price'"),
    (lambda d: (d / "train.csv").write_text(""), "train.csv: the file is empty"),
    (lambda d: (d / "train.csv").write_text(
        "\n".join(line if i != 5 else line.rsplit(",", 1)[0] + ",7"
                  for i, line in enumerate((d / "train.csv").read_text().splitlines()))),
     "train.csv: label column 'click': task 'binary' needs labels in {0, 1}, found [7.0]"),
    # A new user's corrupted log: cut short, with a byte that is not UTF-8 in a cell. The
    # error named no line and Python printed "Exception ignored ... UnicodeDecodeError".
    (lambda d: (d / "train.csv").write_bytes(_corrupted((d / "train.csv").read_bytes())),
     "train.csv: line 1234: not UTF-8 (byte 0xff at column 'user_id'); re-encode the file as "
     "UTF-8"),
]

# Runs commands one after another in one interpreter (a TensorFlow import is most of a
# command's time), each with file descriptor 2 on a file of its own, so that what the command
# and TensorFlow's C++ logging print is checked per command; gc.collect() before the switch
# back puts a finalizer's "Exception ignored" in the stderr of the command that left it.
_ERRORS_DRIVER = """
import gc, json, os, sys, traceback
from fm_keras.cli import main
codes = {}
for name, argv, cwd in json.loads(sys.argv[1]):
    os.chdir(cwd)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.path.join(sys.argv[2], name + ".err"), "w") as err:
        os.dup2(err.fileno(), 2)
        try:
            codes[name] = main(argv)
        except SystemExit as exit:          # argparse's errors, as `python -m` would end
            codes[name] = exit.code
        except BaseException:               # a traceback and exit 1, as `python -m` would end
            traceback.print_exc()
            codes[name] = 1
        finally:
            gc.collect()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
json.dump(codes, sys.stdout)
"""


@pytest.fixture(scope="module")
def cli_errors(small_synth, tmp_path_factory):
    """The exit status and stderr of each command whose input is bad (`_BAD_INPUTS`, then the
    cases below), all run by one `python -m`-like process; the process's own stderr (what
    is printed at interpreter exit) comes back as "exit" with its status."""
    synth_dir, _ = small_synth
    root = tmp_path_factory.mktemp("cli_errors")
    logs = root / "logs"
    logs.mkdir()
    commands = []

    def case(name, files=("train.csv", "valid.csv", "test.csv", "features.yaml",
                          "experiment.yaml")):
        work = root / name
        (work / "data").mkdir(parents=True)
        for file in files:
            (work / "data" / file).write_text((synth_dir / file).read_text())
        return work

    for i, (edit, _) in enumerate(_BAD_INPUTS):
        work = case(f"bad{i}")
        edit(work / "data")
        commands.append((f"bad{i}", ["train", "--config", str(work / "data" / "experiment.yaml"),
                                     "--out", str(work / "run")], str(work)))
    work = case("non_numeric", files=("valid.csv", "test.csv", "features.yaml",
                                      "experiment.yaml"))
    lines = (synth_dir / "train.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")
    row[header.index("item_price")] = "cheap"
    lines[3] = ",".join(row)
    (work / "data" / "train.csv").write_text("\n".join(lines) + "\n")
    commands.append(("non_numeric", ["train", "--config", str(work / "data" / "experiment.yaml"),
                                     "--out", str(work / "run")], str(work)))
    work = case("unfinished", files=())
    (work / "run" / "checkpoints").mkdir(parents=True)
    commands.append(("unfinished", ["evaluate", "--run", str(work / "run"), "--data", "x.csv"],
                     str(work)))
    work = case("tiny_synth", files=())
    commands.append(("tiny_synth", ["synth", "--out", str(work / "s"), "--rows", "10"],
                     str(work)))
    proc = subprocess.run([sys.executable, "-c", _ERRORS_DRIVER, json.dumps(commands), str(logs)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout)
    results = {name: (codes[name], (logs / f"{name}.err").read_text(), root / name)
               for name, _, _ in commands}
    results["exit"] = (proc.returncode, proc.stderr, root)
    return results


@pytest.mark.parametrize("edit,message", _BAD_INPUTS)
def test_bad_input_one_line_error(cli_errors, edit, message):
    code, stderr, work = cli_errors[f"bad{_BAD_INPUTS.index((edit, message))}"]
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fm-keras: error: ") and message in last, stderr
    assert "Exception ignored" not in stderr, stderr
    assert "Exception ignored" not in cli_errors["exit"][1], cli_errors["exit"][1]
    assert not (work / "run").exists()


def test_non_numeric_value_in_numeric_feature(cli_errors):
    code, stderr, work = cli_errors["non_numeric"]
    assert code == 2
    assert ("train.csv: column 'item_price' (numeric feature): non-numeric value 'cheap' "
            "at data row 3") in stderr
    assert not (work / "run").exists()


def test_evaluate_unfinished_run(cli_errors):
    code, stderr, _ = cli_errors["unfinished"]
    assert code == 2
    assert "not a finished fm_keras run" in stderr and "--resume" in stderr


def test_synth_rejects_tiny_rows(cli_errors):
    code, stderr, _ = cli_errors["tiny_synth"]
    assert code == 2 and "--rows must be at least 1000" in stderr


def _last_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("fm-keras: error: "), lines
    return lines[-1]


def test_export_index_score_recommend(small_run, small_synth, tmp_path, capsys):
    synth_dir, _ = small_synth
    base = str(tmp_path / "saved_models")
    assert main(["export", "--run", small_run, "--name", "ctr", "--base", base]) == 0
    ranking = json.loads(capsys.readouterr().out)["model"]
    assert ranking == os.path.join(base, "ctr", "1")
    assert main(["index", "--model", os.path.join(base, "ctr"), "--items",
                 str(synth_dir / "items.csv"), "--name", "ctr_recall", "--base", base,
                 "--k", "10", "--backend", "partitioned", "--partitions", "8",
                 "--partitions-to-search", "3", "--quantize", "int8", "--rescore", "50"]) == 0
    recall = json.loads(capsys.readouterr().out)["model"]
    with open(os.path.join(recall, "assets.extra", "fm_keras.json")) as f:
        index = json.load(f)["index"]
    assert (index["backend"], index["num_partitions"], index["partitions_to_search"],
            index["quantize"], index["rescore"]) == ("partitioned", 8, 3, "int8", 50)
    assert main(["score", "--model", ranking, "--input", str(synth_dir / "test.csv"),
                 "--output", str(tmp_path / "scores.parquet"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] > 1000
    assert main(["recommend", "--model", recall, "--users", str(synth_dir / "test.csv"),
                 "--k", "3", "--output", str(tmp_path / "recs.csv"), "--keep", "user_id",
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 3 and summary["rows"] > 1000


def test_export_commands_bad_input(exports, small_synth, tmp_path, capsys):
    synth_dir, _ = small_synth
    base = str(tmp_path / "out")
    items = (synth_dir / "items.csv").read_text().splitlines()
    (tmp_path / "no_tags.csv").write_text(
        "\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != 2)
                  for line in items) + "\n")
    (tmp_path / "empty.csv").write_text(items[0] + "\n")
    cases = [
        (["score", "--model", str(synth_dir), "--input", str(synth_dir / "test.csv"),
          "--output", str(tmp_path / "s.csv")], "not an fm_keras export"),
        (["index", "--model", exports["ranking"], "--items", str(tmp_path / "no_tags.csv"),
          "--name", "r", "--base", base], "missing column 'item_tags'"),
        (["index", "--model", exports["ranking"], "--items", str(tmp_path / "empty.csv"),
          "--name", "r", "--base", base], "empty.csv: the file has a header but no rows"),
        (["score", "--model", exports["ranking"], "--input", str(synth_dir / "test.csv"),
          "--output", str(tmp_path / "missing" / "s.csv")], "does not exist"),
        (["export", "--run", str(tmp_path), "--name", "x", "--base", base],
         "not a finished fm_keras run"),
        (["index", "--model", exports["ranking"], "--items", str(synth_dir / "items.csv"),
          "--name", "r", "--base", base, "--quantize", "int8"],
         "--quantize is not a setting of --backend scann"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _last_error(capsys), argv
    leftovers = [f for f in os.listdir(tmp_path) if f not in ("no_tags.csv", "empty.csv")]
    assert leftovers == []  # not even an empty model directory


_DRIVER = """
import json, os, sys
from fm_keras.cli import main
for name, argv in json.loads(sys.argv[1]):
    with open(name + ".out", "w") as out:       # a file: stdout is not a terminal
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
    if code:
        sys.exit(f"{name} exited {code}")
"""


def test_every_command_prints_one_json_document_on_a_pipe(small_synth, tmp_path):
    """Issue 11 frictions: with stdout not a TTY, train/evaluate/export/index/score/recommend/
    tune print exactly one JSON document on stdout (Keras's 'Epoch 1/2' lines and progress bars go
    to stderr); best_epoch is 1-based in train's JSON, run.json and state.json alike; no
    'failed call to cuInit' line on a machine without a GPU."""
    synth_dir, _ = small_synth
    config = _short_experiment(synth_dir, tmp_path, epochs=2)
    run, base, test = str(tmp_path / "run"), str(tmp_path / "models"), str(synth_dir / "test.csv")
    commands = [
        ("train", ["train", "--config", str(config), "--out", run]),
        ("evaluate", ["evaluate", "--run", run, "--data", test]),
        ("export", ["export", "--run", run, "--name", "ctr", "--base", base]),
        ("index", ["index", "--model", f"{base}/ctr", "--items", str(synth_dir / "items.csv"),
                   "--name", "ctr_recall", "--base", base, "--k", "5",
                   "--backend", "brute_force"]),
        ("score", ["score", "--model", f"{base}/ctr", "--input", test,
                   "--output", str(tmp_path / "scores.csv")]),
        ("recommend", ["recommend", "--model", f"{base}/ctr_recall", "--users", test,
                       "--k", "3", "--output", str(tmp_path / "recs.csv")]),
        ("tune", ["tune", "--config", str(config), "--trials", "1",
                  "--out", str(tmp_path / "tune")]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: json.loads((tmp_path / f"{name}.out").read_text()) for name, _ in commands}
    assert results["export"]["model"] == os.path.join(base, "ctr", "1")
    assert results["index"]["model"] == os.path.join(base, "ctr_recall", "1")
    assert results["score"]["rows"] > 1000
    assert results["recommend"]["k"] == 3 and results["recommend"]["rows"] > 1000
    assert results["tune"]["best"]["trial"] == 0 and results["tune"]["trials"] == {"complete": 1}
    assert results["evaluate"]["auc"] == pytest.approx(results["train"]["metrics"]["test"]["auc"],
                                                       abs=1e-5)
    assert "Epoch 1/2" in proc.stderr                     # progress went somewhere: stderr
    with open(os.path.join(run, "run.json")) as f:
        record = json.load(f)
    with open(os.path.join(run, "state.json")) as f:
        state = json.load(f)
    aucs = [h["val_auc"] for h in record["history"]]
    assert results["train"]["best_epoch"] == record["best_epoch"] == state["best_epoch"] \
        == 1 + aucs.index(max(aucs))
    import glob
    if not glob.glob("/dev/nvidia[0-9]*"):
        assert "cuInit" not in proc.stderr


def test_sigterm_unwinds_score_and_leaves_no_temp_file(exports, small_synth, tmp_path, capsys,
                                                      monkeypatch):
    """SIGTERM (a cancelled job) used to kill `score` on the spot, leaving its
    .tmp-<pid>-<output> behind; it now unwinds like Ctrl-C: exit 143, nothing written."""
    import signal

    from fm_keras import scoring

    write = scoring.TableWriter.write

    def write_then_sigterm(self, table):
        write(self, table)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(scoring.TableWriter, "write", write_then_sigterm)
    synth_dir, _ = small_synth
    out = tmp_path / "out"
    out.mkdir()
    def ignore(signum, frame):  # the handler in place before (without main's, a no-op)
        pass

    before = signal.signal(signal.SIGTERM, ignore)
    try:
        status = main(["score", "--model", exports["ranking"], "--input",
                       str(synth_dir / "test.csv"), "--output", str(out / "scores.parquet"),
                       "--batch-size", "64", "--quiet"])
        assert signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, before)
    assert status == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fm-keras: terminated"
    assert os.listdir(out) == []


@pytest.mark.parametrize("when", ["after the rename", "during the rename"])
def test_sigterm_after_score_wrote_its_output_exits_0(exports, small_synth, tmp_path, capsys,
                                                     monkeypatch, when):
    """A SIGTERM that came once `score` had renamed its output into place (`timeout` at the
    very end of a job) exited 143, though the output was complete: the job was reported
    failed. Once the rename is done the command finishes: exit 0, its JSON on stdout."""
    import signal

    from fm_keras import scoring

    commit, replace = scoring.TableWriter.commit, os.replace

    def commit_then_sigterm(self):
        commit(self)
        os.kill(os.getpid(), signal.SIGTERM)

    def sigterm_then_replace(src, dst):  # the signal lands inside the commit, before the rename
        if os.path.basename(dst) == "scores.parquet":
            os.kill(os.getpid(), signal.SIGTERM)
        replace(src, dst)

    if when == "after the rename":
        monkeypatch.setattr(scoring.TableWriter, "commit", commit_then_sigterm)
    else:
        monkeypatch.setattr(scoring.os, "replace", sigterm_then_replace)
    synth_dir, _ = small_synth
    out = tmp_path / "out"
    out.mkdir()
    status = main(["score", "--model", exports["ranking"], "--input",
                   str(synth_dir / "test.csv"), "--output", str(out / "scores.parquet"),
                   "--batch-size", "64", "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "terminated" not in captured.err
    assert json.loads(captured.out)["rows"] > 0
    assert os.listdir(out) == ["scores.parquet"]


def test_sigterm_while_a_finished_score_process_exits_is_exit_0(exports, small_synth, tmp_path):
    """The rest of that window: main() has returned and the process is exiting (unloading
    TensorFlow takes a while). main() put SIGTERM's default action back, so the signal killed
    the finished job (-15, 143 to a shell). atexit sends it at a known point of the exit."""
    synth_dir, _ = small_synth
    script = ("import atexit, os, signal, sys\n"
              "from fm_keras.cli import main\n"
              "atexit.register(os.kill, os.getpid(), signal.SIGTERM)\n"
              "status = main()\n"
              # After atexit, CPython's finalization resets a Python handler to SIG_DFL (the
              # trial's 143 while TensorFlow unloads); SIG_IGN is the one it leaves alone.
              "print('ignored:', signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, "
              "file=sys.stderr)\n"
              "sys.exit(status)\n")
    output = tmp_path / "scores.parquet"
    proc = subprocess.run([sys.executable, "-c", script, "score", "--model", exports["ranking"],
                           "--input", str(synth_dir / "test.csv"), "--output", str(output),
                           "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # was -15
    assert "ignored: True" in proc.stderr
    assert json.loads(proc.stdout)["rows"] > 0 and output.is_file()


def test_evaluate_refuses_options_it_would_ignore(small_run, small_synth, tmp_path, capsys):
    """--recall_at on a CTR run without --items printed AUC only; --reliability_plot with
    --items printed Recall@K and drew nothing. Both are now one-line errors."""
    synth_dir, _ = small_synth
    test, items = str(synth_dir / "test.csv"), str(synth_dir / "items.csv")
    assert main(["evaluate", "--run", small_run, "--data", test, "--recall_at", "10"]) == 2
    assert _last_error(capsys).endswith(
        "--recall_at: Recall@K of a CTR run is over a catalog; pass --items")
    plot = tmp_path / "r.png"
    assert main(["evaluate", "--run", small_run, "--data", test, "--items", items,
                 "--reliability_plot", str(plot)]) == 2
    assert "--reliability_plot: the diagram is of click probabilities" in _last_error(capsys)
    assert not plot.exists()


def test_evaluate_exclude_takes_every_file_given_once_or_repeated():
    """`--exclude a b` and `--exclude a --exclude b` both exclude a and b (a repeated flag
    once kept only the last file)."""
    parse = build_parser().parse_args
    once = parse(["evaluate", "--run", "r", "--data", "t.csv", "--exclude", "a.csv", "b.csv"])
    repeated = parse(["evaluate", "--run", "r", "--data", "t.csv", "--exclude", "a.csv",
                      "--exclude", "b.csv"])
    assert once.exclude == repeated.exclude == ["a.csv", "b.csv"]


AB_YAML = """\
name: pipe
unit: user_id
salt: s
arms:
  - {name: a, model: ctr, label: a, weight: 0.5}
  - {name: b, model: ctr, label: b, weight: 0.5}
"""


@pytest.mark.parametrize("command, stderr_too", [("synth", False), ("ab report", False),
                                                 ("ab report", True)])
def test_a_reader_that_closed_the_pipe_is_exit_141_without_a_traceback(tmp_path, command,
                                                                       stderr_too):
    """`fm-keras ab report ... | head -1` (and synth, pipeline run) ended in a BrokenPipeError
    traceback, exit 1, after the work was done. The reader here closes its end before the
    command prints, so every run meets the closed pipe (a `head` racing the writer would not)."""
    (tmp_path / "ab.yaml").write_text(AB_YAML)
    rows = ["user_id,arm,timestamp,impressions,clicks"]
    rows += [f"u{i},{'ab'[i % 2]},1,10,{i % 3}" for i in range(200)]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    args = {"synth": ["synth", "--out", "s", "--span", "1", "--rows", "1000"],
            "ab report": ["ab", "report", "--experiment", "ab.yaml", "--events", "events.csv",
                          "--html", "report.html"]}[command]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: e.g. `head -1` after its line
    try:
        proc = subprocess.run([sys.executable, "-m", "fm_keras.cli", *args], cwd=tmp_path,
                              stdout=write_end, text=True, timeout=300,
                              stderr=write_end if stderr_too else subprocess.PIPE)  # 2>&1
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr and proc.stderr[-3000:]
    err = proc.stderr or ""
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    # the work itself was done before the output met the closed pipe
    assert (tmp_path / ("s/span-1/part-0.csv" if command == "synth" else "report.html")).exists()


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    # e.g. a socket to a model server: a real error, not a reader that went away
    def command(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(sys.modules["fm_keras.cli"]._COMMANDS, "synth", command)
    with pytest.raises(BrokenPipeError):
        main(["synth", "--out", "x"])


def test_building_the_parser_imports_no_heavy_library():
    # Every command builds the whole parser first: `fm-keras --help` took 2.5 s while the
    # A/B commands' choices imported scipy.stats and pandas (0.5 s without them).
    code = ("import sys; from fm_keras.cli import build_parser; build_parser(); "
            "print(*sorted(m for m in ('tensorflow', 'scipy', 'pandas', 'sklearn', 'pyarrow') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == ""
