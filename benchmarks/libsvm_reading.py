"""libSVM / libFFM reading speed: rows/s of the one reader on a libSVM or libFFM file vs the
same rows as CSV, and through the training read path (`load_split`).

Writes (once, into --cache) a libSVM file of --rows lines of --tokens ``idx:val`` tokens, a
libFFM file of the same tokens over --fields fields, and each as CSV: ``label,features`` with
``features`` the tokens joined by ``|``, and ``label,field_0,...``: the cells the libSVM/libFFM
reader makes of those lines. Then reads each file through `fm_keras.reading.record_batches` (the
block reader every command uses) and `fm_keras.data.load_split` (train/evaluate), alternating
formats, --rounds times, and prints rows/s per round (the reader's also per CPU second) and
the median, as one JSON document.
The peer: a per-line Python loop (str.split, float() of the label and each value, "|".join)
over the libSVM file, which checks less than the reader does. --baseline REF also reads the
libSVM and libFFM files with the parser of git revision REF (its fm_keras/libsvm.py in place of
the current one), alternating with the current parser in each round.

    python benchmarks/libsvm_reading.py [--rows 1000000 --tokens 20 --fields 10 --rounds 3]
                                        [--baseline 690c45e]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fm_keras import reading
from fm_keras.config import FeatureConfig
from fm_keras.data import load_split
from fm_keras.reading import record_batches


def _write_lines(path: str, lines: pa.Array) -> None:
    tmp = path + ".tmp"
    pacsv.write_csv(pa.table({"line": lines}), tmp,
                    pacsv.WriteOptions(include_header=False, quoting_style="none"))
    os.replace(tmp, path)


def _write_csv(path: str, columns: dict[str, pa.Array]) -> None:
    tmp = path + ".tmp"
    pacsv.write_csv(pa.table(columns), tmp, pacsv.WriteOptions(quoting_style="none"))
    os.replace(tmp, path)


def make_files(cache: str, rows: int, tokens: int, fields: int, seed: int = 0) -> dict:
    """{name: path} of the four files, written in blocks of rows if not in `cache` yet."""
    tag = f"{rows}x{tokens}x{fields}"
    paths = {"libsvm": f"svm-{tag}.libsvm", "csv (libsvm's cells)": f"svm-{tag}.csv",
             "libffm": f"ffm-{tag}.libffm", "csv (libffm's cells)": f"ffm-{tag}.csv"}
    paths = {k: os.path.join(cache, v) for k, v in paths.items()}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(cache, exist_ok=True)
    rng = np.random.default_rng(seed)
    svm, svm_csv, ffm, ffm_csv = [], [], [], []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        label = pc.cast(pa.array(rng.integers(0, 2, n)), pa.string())
        idx = [pc.cast(pa.array(rng.integers(0, 100_000, n)), pa.string()) for _ in range(tokens)]
        val = [pc.cast(pa.array(np.round(rng.random(n), 3)), pa.string()) for _ in range(tokens)]
        pair = [pc.binary_join_element_wise(i, v, ":") for i, v in zip(idx, val)]
        field = [j * fields // tokens for j in range(tokens)]
        svm.append(pc.binary_join_element_wise(label, *pair, " "))
        svm_csv.append((label, pc.binary_join_element_wise(*pair, "|")))
        ffm.append(pc.binary_join_element_wise(
            label, *(pc.binary_join_element_wise(pa.scalar(str(f)), p, ":")
                     for f, p in zip(field, pair)), " "))
        ffm_csv.append((label, [pc.binary_join_element_wise(
            *[p for f, p in zip(field, pair) if f == g], "|") for g in range(fields)]))
    _write_lines(paths["libsvm"], pa.concat_arrays(svm))
    _write_csv(paths["csv (libsvm's cells)"],
               {"label": pa.concat_arrays([b[0] for b in svm_csv]),
                "features": pa.concat_arrays([b[1] for b in svm_csv])})
    _write_lines(paths["libffm"], pa.concat_arrays(ffm))
    _write_csv(paths["csv (libffm's cells)"],
               {"label": pa.concat_arrays([b[0] for b in ffm_csv]),
                **{f"field_{g}": pa.concat_arrays([b[1][g] for b in ffm_csv])
                   for g in range(fields)}})
    return paths


def reader_rows_per_second(path: str, columns: list[str]) -> tuple[float, float]:
    """Rows per second of wall time and of this process's CPU time (all its threads: less
    sensitive than wall time to other jobs on the machine)."""
    started, cpu, rows = time.perf_counter(), time.process_time(), 0
    for _, batch in record_batches(path, columns, 65_536):
        rows += batch.num_rows
    return rows / (time.perf_counter() - started), rows / (time.process_time() - cpu)


def python_loop_rows_per_second(path: str) -> float:
    """The peer: the libSVM file parsed line by line in Python (label and values checked by
    float(), the features joined by '|'), the columns kept as lists."""
    started, labels, features = time.perf_counter(), [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            float(tokens[0])
            for token in tokens[1:]:
                float(token.rsplit(":", 1)[1])
            labels.append(tokens[0])
            features.append("|".join(tokens[1:]))
    return len(labels) / (time.perf_counter() - started)


def load_split_rows_per_second(path: str, features: list[FeatureConfig]) -> float:
    started = time.perf_counter()
    split = load_split([path], features, "label")
    return len(split) / (time.perf_counter() - started)


def baseline_parser(ref: str):
    """The fm_keras/libsvm.py of git revision `ref`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:fm_keras/libsvm.py"], check=True,
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"libsvm_{ref}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


@contextlib.contextmanager
def parser_of(module):
    """The reader parses libSVM/libFFM lines with `module` (None: the current parser)."""
    current = reading.libsvm
    reading.libsvm = module or current
    try:
        yield
    finally:
        reading.libsvm = current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=20, help="idx:val tokens per line")
    parser.add_argument("--fields", type=int, default=10, help="libFFM fields")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="also read with the parser of this git revision")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                        "fm-keras-bench", "libsvm"))
    args = parser.parse_args()
    print(f"fm-keras: writing/reusing files under {args.cache}", file=sys.stderr)
    paths = make_files(args.cache, args.rows, args.tokens, args.fields)
    columns = {"libsvm": ["label", "features"], "csv (libsvm's cells)": ["label", "features"]}
    ffm_columns = ["label", *(f"field_{g}" for g in range(args.fields))]
    columns.update({"libffm": ffm_columns, "csv (libffm's cells)": ffm_columns})
    figures: dict = {name: {"reader": [], "reader (CPU)": [], "load_split": []}
                     for name in paths}
    figures["libsvm"]["python loop"] = []
    runs = [(name, path, None) for name, path in paths.items()]
    if args.baseline:
        old = baseline_parser(args.baseline)
        for fmt in ("libsvm", "libffm"):
            name = f"{fmt} (parser of {args.baseline})"
            figures[name] = {"reader": [], "reader (CPU)": [], "load_split": []}
            columns[name] = columns[fmt]
            runs.insert([r[0] for r in runs].index(fmt) + 1, (name, paths[fmt], old))
    for round_ in range(args.rounds):
        for name, path, module in runs:
            features = [FeatureConfig(c, "multi_hot", "user") for c in columns[name][1:]]
            with parser_of(module):
                wall, cpu = reader_rows_per_second(path, columns[name])
                figures[name]["reader"].append(round(wall))
                figures[name]["reader (CPU)"].append(round(cpu))
                figures[name]["load_split"].append(
                    round(load_split_rows_per_second(path, features)))
            if name == "libsvm":
                figures[name]["python loop"].append(round(python_loop_rows_per_second(path)))
            print(f"fm-keras: round {round_ + 1} {name}: {figures[name]}", file=sys.stderr)
    result = {"rows": args.rows, "tokens_per_row": args.tokens, "fields": args.fields,
              "load_average": os.getloadavg(),
              "files_mib": {k: round(os.path.getsize(p) / 2**20, 1) for k, p in paths.items()},
              "rows_per_second": figures,
              "median_rows_per_second": {k: {path: statistics.median(v) for path, v in f.items()}
                                         for k, f in figures.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
