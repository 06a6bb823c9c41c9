"""`fm-keras recommend` with and without exclusions, per recall backend, in one run.

Builds a recall export per backend over one synthetic catalog (features drawn like
`fm-keras synth`'s catalog), writes a users file whose `seen` column lists --seen random
catalog ids per user ('|'-separated), and runs `recommend` (the CLI's code path: CSV in, CSV
out) over the same users without and with `--exclude-column seen` in rounds (one run of each,
back to back, which goes first alternating), best of --repeat; prints users/s of both
(`recommend`'s own figure: reading, searching and writing, without the model load), their
ratio per backend, the ratio of each round and the median of those, and the signature the
exclusions went through (``exclude_seen_keys``, item keys, when every catalog id is 1-8 bytes:
this benchmark's are; else ``exclude_seen``).

    python benchmarks/exclusions.py [--items 100000] [--users 1000] [--seen 600] [--k 10]
        [--model saved_models/ctr/1 --users-file data/test.csv] [--backends scann,brute_force]
        [--reuse WORK_DIR]

--reuse measures an earlier run's catalog and recall exports again (their work directory, printed
at the end), e.g. under ``chrt -f 10`` to stand in for a quiet machine on a busy one.
"""

from __future__ import annotations

import argparse
import glob
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fm_keras.recall import build_index  # noqa: E402
from fm_keras.scoring import recommend  # noqa: E402
from fm_keras.servables import export_metadata  # noqa: E402
from recall import model_arguments, prepare  # noqa: E402  (benchmarks/recall.py)


def users_file(path: str, test_csv: str, query_names: list[str], n: int, items: int,
               seen: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.read_csv(test_csv, dtype=str).drop_duplicates("user_id")
    frame = frame.sample(n, replace=len(frame) < n, random_state=seed)[query_names]
    frame["seen"] = ["|".join(f"b{i}" for i in rng.choice(items, seen, replace=False))
                     for _ in range(n)]
    frame.to_csv(path, index=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, 100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seen", type=int, default=600, help="excluded ids per user")
    parser.add_argument("--k", type=int, default=10, help="items per user")
    parser.add_argument("--index-k", type=int, default=100, help="k the index is built with")
    parser.add_argument("--backends", default="scann,partitioned,brute_force")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds of the two cases (best is kept)")
    parser.add_argument("--reuse", help="work directory of an earlier run: its catalog and "
                        "recall exports are measured again, not rebuilt")
    args = parser.parse_args()
    work, model, test_csv, catalog = prepare(args, "fm-exclusions-bench-")
    users = os.path.join(work, "users.csv")
    users_file(users, test_csv, export_metadata(model)[1]["query_features"], args.users,
               args.items, args.seen)
    print(f"{args.users:,} users x {args.seen} excluded ids, {args.items:,} items, k={args.k}")
    print(f"{'backend':12s} {'no exclusions users/s':>22s} {'with exclusions':>16s} {'ratio':>6s}")
    ratios = {}
    for backend in args.backends.split(","):
        built = sorted(glob.glob(os.path.join(work, "m", f"recall_{backend}", "*")),
                       key=lambda p: int(os.path.basename(p)))
        path = built[-1] if args.reuse and built else build_index(
            model, catalog, f"recall_{backend}", base=os.path.join(work, "m"), k=args.index_k,
            backend=backend)
        rates, signature = {None: [], "seen": []}, None
        for i in range(args.repeat):  # alternating, so that a load change hits both alike
            for column in ((None, "seen") if i % 2 == 0 else ("seen", None)):
                out = os.path.join(work, f"recs-{backend}-{column}.csv")
                summary = recommend(path, [users], out, args.k, exclude_column=column,
                                    progress=False)
                # users/s of the streaming part (model load and first call excluded)
                rates[column].append(summary["rows"] / summary["seconds"])
                signature = summary["signature"] if column else signature
                rows = len(pd.read_csv(out, usecols=["rank"]))
                assert rows == args.users * args.k, (backend, column, rows, summary)
        best = {column: max(r) for column, r in rates.items()}
        rounds = [w / wo for w, wo in zip(rates["seen"], rates[None])]
        ratios[backend] = best["seen"] / best[None]
        print(f"{backend:12s} {best[None]:22,.0f} {best['seen']:16,.0f} "
              f"{ratios[backend]:6.2f}  (load {os.getloadavg()[0]:.1f}; per round "
              f"{', '.join(f'{r:.2f}' for r in rounds)}, median {np.median(rounds):.2f}; "
              f"{signature})", flush=True)
    print("users/s with exclusions / without (issue 12 asks >= 0.5): " +
          ", ".join(f"{b} {r:.2f}" for b, r in ratios.items()))
    print(f"work directory (--reuse): {work}")

if __name__ == "__main__":
    main()
