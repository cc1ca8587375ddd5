"""Backup and restore of a metadata store with a million metric rows, against doing it by hand.

Not a test: run it with ``.venv/bin/python bench/bench_backup.py`` on the
host to measure (it needs the ``sqlite3`` and ``gzip`` commands). It builds a
database with MLflow's own schema, then times in one run, on one machine:

- ours: ``ops/host_backup.py`` backing up into a directory (snapshot,
  integrity check, row counts, gzip, SHA-256, manifest) and restoring from it
  (SHA-256, decompress, quick check, written to disk, swap), with no server to stop;
- by hand: ``sqlite3 DB .backup`` then ``gzip``; and ``gunzip`` then a copy.

It prints each time, the ratio of ours to by-hand, and the sizes. The aim is a
ratio within 1.3 with our verification included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops import host_backup


def build(path: Path, metrics: int) -> None:
    """A store with MLflow's schema and ``metrics`` metric rows over 1000 runs."""
    subprocess.run(
        [sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{path}"],
        check=True,
        capture_output=True,
    )
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    runs = 1000
    now = int(time.time() * 1000)
    with db:
        db.executemany(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
            "user_id, status, start_time, lifecycle_stage, artifact_uri, experiment_id) "
            "VALUES (?, ?, 'LOCAL', '', '', 'bench', 'FINISHED', ?, 'active', '', 0)",
            [(f"{n:032x}", f"run-{n}", now) for n in range(runs)],
        )
        per_run = metrics // runs
        for n in range(runs):
            db.executemany(
                "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                "VALUES ('loss', ?, ?, ?, ?, 0)",
                [(step / per_run, now + step, f"{n:032x}", step) for step in range(per_run)],
            )
    db.close()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    for command in ("sqlite3", "gzip", "gunzip"):
        if shutil.which(command) is None:
            sys.exit(f"the by-hand baseline needs `{command}`")

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data, store, hand = root / "data", root / "store", root / "hand"
        for folder in (data, store, hand):
            folder.mkdir()
        live = data / "mlflow.db"
        print(f"building a store with {args.metrics:,} metric rows ...", flush=True)
        build(live, args.metrics)

        def by_hand_backup() -> None:
            (hand / "copy.db.gz").unlink(missing_ok=True)
            subprocess.run(["sqlite3", str(live), f".backup {hand / 'copy.db'}"], check=True)
            subprocess.run(["gzip", str(hand / "copy.db")], check=True)

        def by_hand_restore() -> None:
            subprocess.run(["gunzip", "-k", "-f", str(hand / "copy.db.gz")], check=True)
            shutil.copyfile(hand / "copy.db", data / "by-hand.db")

        def ours_backup() -> None:
            host_backup.backup(str(data), host_backup.DirStore(str(store)), keep=1)

        def ours_restore() -> None:
            host_backup.restore(str(data), host_backup.DirStore(str(store)), "latest")

        names = ("hand backup", "ours backup", "hand restore", "ours restore")
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            # Alternate, so a noisy neighbour hurts both sides alike.
            times["hand backup"].append(timed(by_hand_backup))
            times["ours backup"].append(timed(ours_backup))
            times["hand restore"].append(timed(by_hand_restore))
            times["ours restore"].append(timed(ours_restore))
        best = {name: min(values) for name, values in times.items()}

        (manifest,) = [e for e in host_backup.listing(host_backup.DirStore(str(store)))]
        ours_size = sum(f["compressed_size"] for f in manifest["files"])
        print(f"database: {os.path.getsize(live) / 2**20:.1f} MiB, "
              f"{manifest['rows']['metrics']:,} metric rows")  # fmt: skip
        hand_size = (hand / "copy.db.gz").stat().st_size
        print(f"compressed: ours {ours_size / 2**20:.1f} MiB (gzip -{host_backup.LEVEL}), "
              f"by hand {hand_size / 2**20:.1f} MiB (gzip -6)")  # fmt: skip
        for what in ("backup", "restore"):
            ours, theirs = best[f"ours {what}"], best[f"hand {what}"]
            print(f"{what}: ours {ours:.2f}s, by hand {theirs:.2f}s, ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
