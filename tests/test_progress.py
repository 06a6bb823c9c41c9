"""progress: lines for humans on stderr, and periodic ones during long passes."""

from fm_keras import progress
from fm_keras.progress import RowProgress, log


def test_log_writes_one_prefixed_line_to_stderr(capsys):
    log("hello")
    out = capsys.readouterr()
    assert out.err == "fm-keras: hello\n" and out.out == ""


def test_row_progress_logs_at_most_once_per_interval(capsys, monkeypatch):
    clock = iter([100.0, 110.0, 131.0, 140.0, 162.0])  # start, then one per update
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    rows = RowProgress("fit pass", interval=30.0)
    for n in (1000, 2000, 3000, 4000):
        rows.update(n)
    assert capsys.readouterr().err.splitlines() == [
        "fm-keras: fit pass: 3,000 rows so far (97 rows/s)",       # 31 s: 3,000 / 31
        "fm-keras: fit pass: 10,000 rows so far (161 rows/s)"]     # 62 s: 10,000 / 62
