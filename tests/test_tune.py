"""fm-keras tune: results written, the baseline trial, pruning, a study shared by two
processes, and bad input that leaves nothing behind."""

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from fm_keras import hugepages
from fm_keras.cli import main
from fm_keras.config import load_experiment
from fm_keras.search_space import load_search_space
from fm_keras.tune import BEST_EXPERIMENT, PLOT, TRIALS_CSV, PruneOnValidation, tune

SPACE = ("optimizer: [adagrad]\nlearning_rate: {low: 0.05, high: 0.5, log: true}\n"
         "embedding_dim: [4, 8]\nbatch_size: 1024\nl2_linear: null\nfeature_l2: null\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6,000-row synthetic set, an experiment of 2 epochs and a small search space."""
    from fm_keras.synth import generate

    out = tmp_path_factory.mktemp("tune")
    generate(str(out), rows=6000, seed=5)
    with open(out / "experiment.yaml", "a") as f:
        f.write("training: {epochs: 2}\n")
    assert load_experiment(out / "experiment.yaml").training.epochs == 2
    (out / "space.yaml").write_text(SPACE)
    return out


def test_tune_writes_best_experiment_table_and_plot(tiny, tmp_path):
    config = load_experiment(tiny / "experiment.yaml")
    space = load_search_space(str(tiny / "space.yaml"), config)
    out = tmp_path / "tune"
    result = tune(config, str(out), 3, space=space, seed=0)
    assert result["trials"] == {"complete": 3} and result["storage"] == "in-memory"
    table = pd.read_csv(out / TRIALS_CSV)
    assert list(table["number"]) == [0, 1, 2]
    assert table["user_attrs_baseline"].fillna(False).tolist() == [True, False, False]
    assert result["best"]["value"] == pytest.approx(table["value"].max())
    assert (out / PLOT).read_bytes()[:4] == b"\x89PNG"
    # The best experiment is a loadable YAML with the best trial's values; its run exists.
    best = load_experiment(out / BEST_EXPERIMENT)
    assert best.to_dict() == space.apply(config, result["best"]["params"]).to_dict()
    assert os.path.exists(os.path.join(result["best"]["run"], "run.json"))
    assert sorted(os.listdir(out / "trials")) == ["trial-0", "trial-1", "trial-2"]
    # Trial 0 is the experiment as given.
    with open(out / "trials" / "trial-0" / "experiment.json") as f:
        assert json.load(f) == json.loads(json.dumps(config.to_dict()))


def test_pruning_callback_reports_and_stops():
    class Trial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return len(self.reported) >= 2

    trial = Trial()
    callback = PruneOnValidation(trial, "val_auc")
    callback.set_model(SimpleNamespace(stop_training=False))
    callback.on_epoch_end(0, {"val_auc": 0.6, "loss": 0.5})
    assert not callback.model.stop_training and callback.pruned_at is None
    callback.on_epoch_end(1, {"val_auc": float("nan")})  # not a value: not reported
    callback.on_epoch_end(2, {"val_auc": 0.61})
    assert trial.reported == [(0, 0.6), (2, 0.61)]
    assert callback.model.stop_training and callback.pruned_at == 2


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "fm_keras.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_share_one_study(tiny, tmp_path):
    """Must show 2: two `fm-keras tune` on one sqlite storage: one study, no trial repeated
    (numbers, run directories and values all distinct), one best."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [_cli("tune", "--config", str(tiny / "experiment.yaml"), "--trials", "2",
                  "--storage", storage, "--study_name", "shared", "--search_space",
                  str(tiny / "space.yaml"), "--out", str(tmp_path / name), cwd=tmp_path)
             for name in ("a", "b")]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout))  # stdout is one JSON document
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len({t.user_attrs["run_dir"] for t in trained}) == len(trained)
    values = [json.dumps(t.params, sort_keys=True) + str(t.user_attrs.get("baseline"))
              for t in trained]
    assert len(set(values)) == len(values)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trained) == 1
    assert len({os.path.dirname(t.user_attrs["run_dir"]) for t in trained}) == 2  # both worked
    last = [r for r in results if "running" not in r["trials"]]
    assert last and all(r["best"]["trial"] == study.best_trial.number for r in last)
    # The program restarted itself with huge pages where this machine has them.
    env = hugepages.with_tunable(dict(os.environ), hugepages.thp_mode(),
                                 hugepages.glibc_version()) or os.environ
    with open(os.path.join(trained[0].user_attrs["run_dir"], "run.json")) as f:
        assert json.load(f)["versions"]["transparent_huge_pages"] == hugepages.state(env)


@pytest.mark.parametrize("args,message", [
    (["--search_space", "bad.yaml"], "bad.yaml: unknown search-space key 'lerning_rate'"),
    (["--trials", "0"], "--trials must be at least 1, got 0"),
    (["--storage", "sqlite:////no/such/dir/study.db"],
     "--storage sqlite:////no/such/dir/study.db: cannot open the study storage"),
    (["--timeout", "-1"], "--timeout must be > 0 seconds"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, monkeypatch,
                                                     args, message):
    """Must show 5."""
    (tmp_path / "bad.yaml").write_text("lerning_rate: [0.1]\n")
    args = ["--trials", "1", *args] if "--trials" not in args else args
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["tune", "--config", str(tiny / "experiment.yaml"), "--out", str(out),
                 *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fm-keras: error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.yaml"]


@pytest.mark.parametrize("file", ["out", "out/trials"])
def test_out_that_is_a_file_is_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, file):
    """--out naming a file (or holding a file named trials) was a NotADirectoryError
    traceback, exit 1, after the study had been created in the storage."""
    if file == "out/trials":
        (tmp_path / "out").mkdir()
    (tmp_path / file).write_text("not a directory")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["tune", "--config", str(tiny / "experiment.yaml"), "--trials", "1",
                 "--storage", storage, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"fm-keras: error: --out {tmp_path / 'out'}: {tmp_path / file} is a file, "
                   "not a tune directory; choose another --out\n")
    assert not (tmp_path / "study.db").exists()


def test_a_trial_directory_of_another_study_is_kept_and_named(tiny, tmp_path, capsys):
    """Two studies tuned into one --out: trial 0 of the second found trial-0 of the first,
    failed on it ("holds a finished run"), and the stopped trial's clean-up deleted it."""
    kept = tmp_path / "out" / "trials" / "trial-0"
    kept.mkdir(parents=True)
    (kept / "run.json").write_text("{}")
    assert main(["tune", "--config", str(tiny / "experiment.yaml"), "--trials", "1",
                 "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study_name", "second",
                 "--out", str(tmp_path / "out")]) == 2
    assert (kept / "run.json").read_text() == "{}"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"fm-keras: error: --out {tmp_path / 'out'}: {kept} exists already (a trial "
                    "of another study tuned into this --out?); give each study its own --out")


def test_tune_retrieval_maximizes_validation_recall(implicit_data, tmp_path):
    """A retrieval experiment is tuned on its early-stopping metric, validation Recall@K,
    maximized (it once fell to regression's val_rmse and failed after trial 0)."""
    from retrieval_testlib import implicit_experiment

    from fm_keras.config import experiment_from_dict

    config = experiment_from_dict(implicit_experiment(implicit_data, epochs=2),
                                  base_dir=implicit_data, source="retrieval.yaml")
    result = tune(config, str(tmp_path / "tune"), 2, seed=0)
    assert result["monitor"] == "val_recall_at_k" and result["trials"] == {"complete": 2}
    table = pd.read_csv(tmp_path / "tune" / TRIALS_CSV)
    assert result["best"]["value"] == pytest.approx(table["value"].max())


@pytest.mark.parametrize("stop", ["Terminated", "KeyboardInterrupt"])
def test_stopped_trial_is_failed_and_its_run_directory_removed(tiny, tmp_path, capsys,
                                                               monkeypatch, stop):
    """SIGTERM (or Ctrl-C) in the middle of a trial: exit 143 (130); the study tells the trial
    FAIL (not RUNNING forever) and its half-written run directory is gone."""
    import optuna

    from fm_keras import tune as tune_module
    from fm_keras.errors import Terminated

    def stopped_train(config, run_dir, **kwargs):
        os.makedirs(os.path.join(run_dir, "checkpoints"))
        with open(os.path.join(run_dir, "state.json"), "w") as f:
            f.write("{}")
        raise Terminated() if stop == "Terminated" else KeyboardInterrupt()

    monkeypatch.setattr(tune_module, "train", stopped_train)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "out"
    code = main(["tune", "--config", str(tiny / "experiment.yaml"), "--trials", "2",
                 "--storage", storage, "--study_name", "s", "--out", str(out),
                 "--search_space", str(tiny / "space.yaml")])
    assert code == (143 if stop == "Terminated" else 130)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
    assert os.listdir(out / "trials") == []


def test_changed_search_space_of_a_study_is_one_line_exit_2_before_any_trial(
        tiny, tmp_path, capsys):
    """A study resumed with another set of choices for a parameter (batch_size fixed at 1024,
    now [512, 1024]): one line naming the parameter, exit 2, no trial added (it once failed
    a trial with Optuna's "CategoricalDistribution does not support dynamic value space")."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"batch_size": 1024}, distributions={"batch_size": CategoricalDistribution([1024])},
        value=0.7, user_attrs={"baseline": True}))
    (tmp_path / "changed.yaml").write_text(SPACE.replace("batch_size: 1024",
                                                         "batch_size: [512, 1024]"))
    assert main(["tune", "--config", str(tiny / "experiment.yaml"), "--trials", "1",
                 "--storage", storage, "--study_name", "s", "--out", str(tmp_path / "out"),
                 "--search_space", str(tmp_path / "changed.yaml")]) == 2
    err = capsys.readouterr().err  # Optuna's log lines ("Using an existing study"), then ours
    assert "Traceback" not in err and err.count("fm-keras:") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("fm-keras: error: --study_name s: the search space differs")
    assert "batch_size is one of [512, 1024] here, fixed 1024" in last
    assert "use a new --study_name" in last
    assert len(optuna.load_study(study_name="s", storage=storage).get_trials()) == 1
    assert not (tmp_path / "out").exists()


def test_resumed_study_runs_the_baseline_that_was_stopped(tiny, tmp_path, capsys, optuna_log,
                                                         monkeypatch):
    """Ctrl-C in trial 0 (the experiment as given), then the same command again: the baseline
    is trained, not lost (it was never enqueued again, and a re-enqueued one was taken for a
    duplicate of the failed one), so the search still ends no worse than the experiment."""
    import optuna

    from fm_keras import tune as tune_module

    real_train = tune_module.train

    def interrupted(config, run_dir, **kwargs):
        os.makedirs(run_dir)
        raise KeyboardInterrupt()

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["tune", "--config", str(tiny / "experiment.yaml"), "--trials", "1", "--storage",
            storage, "--study_name", "s", "--out", str(tmp_path / "out"),
            "--search_space", str(tiny / "space.yaml")]
    monkeypatch.setattr(tune_module, "train", interrupted)
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fm-keras: interrupted"
    assert not _optuna_failures(optuna_log)  # Optuna logged the interrupt's traceback
    monkeypatch.setattr(tune_module, "train", real_train)
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [(t.state.name, bool(t.user_attrs.get("baseline"))) for t in trials] == [
        ("FAIL", True), ("COMPLETE", True)]
    assert result["best"]["trial"] == 1 and result["best"]["baseline"]


def test_bad_data_in_the_first_trial_is_one_line_exit_2_nothing_written(tiny, tmp_path,
                                                                        capsys, optuna_log):
    """A feature column the data lacks is found by the first trial's read: one line (Optuna
    once logged the DataError's traceback first), exit 2, and neither the study nor the tune
    directory stays (a study holding only a failed baseline was left behind)."""
    import optuna

    (tmp_path / "typo.yaml").write_text((tiny / "experiment.yaml").read_text())
    spec = (tiny / "features.yaml").read_text()
    assert "name: item_id," in spec
    (tmp_path / "features.yaml").write_text(spec.replace("name: item_id,", "name: item_idd,"))
    for name in ("train.csv", "valid.csv", "test.csv"):  # the experiment's relative paths
        os.symlink(tiny / name, tmp_path / name)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "out"
    assert main(["tune", "--config", str(tmp_path / "typo.yaml"), "--trials", "2",
                 "--storage", storage, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not _optuna_failures(optuna_log)
    lines = [line for line in captured.err.splitlines() if line.startswith("fm-keras: error")]
    assert len(lines) == 1 and "missing column 'item_idd'" in lines[0]
    assert not out.exists()
    assert optuna.get_all_study_names(storage=storage) == []


@pytest.fixture
def optuna_log(caplog):
    """caplog with Optuna's records too (Optuna stops its logger propagating to the root
    logger once its own stderr handler is set up)."""
    logger = logging.getLogger("optuna")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _optuna_failures(caplog) -> list:
    """Optuna's "Trial N failed ..." records (the first with the error's traceback)."""
    return [r for r in caplog.records if r.name.startswith("optuna") and "failed" in r.message]


def test_a_diverged_baseline_is_not_trained_again_on_resume(tiny, tmp_path, monkeypatch):
    """A baseline that diverged (TrainingDivergedError, FAIL) was taken for a stopped one and
    enqueued again by every later tune of the study: the same seeded run, diverging again."""
    import optuna

    from fm_keras import tune as tune_module
    from fm_keras.errors import TrainingDivergedError

    def diverging(config, run_dir, **kwargs):
        os.makedirs(run_dir)
        raise TrainingDivergedError("loss became NaN")

    monkeypatch.setattr(tune_module, "train", diverging)
    config = load_experiment(tiny / "experiment.yaml")
    space = load_search_space(str(tiny / "space.yaml"), config)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for _ in range(2):
        with pytest.raises(TrainingDivergedError, match="no trial of study 's' completed"):
            tune(config, str(tmp_path / "out"), 1, storage=storage, study_name="s",
                 space=space, seed=0)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [(t.state.name, bool(t.user_attrs.get("baseline"))) for t in trials] == [
        ("FAIL", True), ("FAIL", False)]


def test_bad_data_when_another_process_deleted_the_study_first_is_still_one_line(
        tiny, tmp_path, capsys, monkeypatch):
    """Two tunes of one new study started together on bad data: the first to stop deletes
    the study (it holds only failed trials); the second's clean-up then read the deleted
    study: a KeyError traceback, exit 1, instead of the data error."""
    import optuna

    from fm_keras import tune as tune_module

    (tmp_path / "typo.yaml").write_text((tiny / "experiment.yaml").read_text())
    spec = (tiny / "features.yaml").read_text()
    (tmp_path / "features.yaml").write_text(spec.replace("name: item_id,", "name: item_idd,"))
    for name in ("train.csv", "valid.csv", "test.csv"):
        os.symlink(tiny / name, tmp_path / name)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    real_abandon = tune_module._abandon

    def abandon_then_other_process_deletes(study, trial):
        real_abandon(study, trial)
        optuna.delete_study(study_name=study.study_name, storage=storage)

    monkeypatch.setattr(tune_module, "_abandon", abandon_then_other_process_deletes)
    assert main(["tune", "--config", str(tmp_path / "typo.yaml"), "--trials", "1",
                 "--storage", storage, "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("fm-keras: error")]
    assert len(lines) == 1 and "missing column 'item_idd'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_optuna_lines_go_to_the_current_stderr_even_after_the_first_one_is_closed(
        tmp_path, monkeypatch):
    """Optuna's handler kept the stderr of its first line: once that stream was closed (a
    test's capture, a notebook cell), each later line printed "--- Logging error ---" and a
    traceback. Every tune now logs Optuna's lines to the stderr of the moment."""
    import io

    import optuna

    from fm_keras.tune import optuna_log_to_current_stderr

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    optuna_log_to_current_stderr()
    optuna.create_study(study_name="one", storage=f"sqlite:///{tmp_path / 'a.db'}")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    optuna_log_to_current_stderr()  # a second tune in the process: no second handler
    optuna.create_study(study_name="two", storage=f"sqlite:///{tmp_path / 'b.db'}")
    lines = second.getvalue().splitlines()
    assert lines and all(line.startswith("[I ") for line in lines), lines
    assert any("two" in line for line in lines) and "Logging error" not in second.getvalue()
