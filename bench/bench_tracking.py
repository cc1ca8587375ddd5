"""Metrics through ops.tracking's buffer against one mlflow.log_metric call per point.

    .venv/bin/python bench/bench_tracking.py [--points 10000] [--aim 20]

Starts its own MLflow server on loopback (SQLite in WAL mode, one worker), opens
one run with ``tracked_run``, and logs the same points twice into it: through the helper
(then flushed), and with ``mlflow.log_metric`` one call each. It reports the wall time and
the number of HTTP requests of each, counted from the server's access log, and exits
non-zero when the helper is less than ``--aim`` times faster.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402 - after the path, like the imports from the checkout below
from mlflow.tracking import MlflowClient  # noqa: E402

from ops.tracking import tracked_run  # noqa: E402
from tests.fixtures_mlflow import running_server  # noqa: E402

REQUEST = re.compile(rb'"(GET|POST|PUT|PATCH|DELETE|HEAD) /')


def main() -> int:
    args = _arguments()
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as scratch:
        folder = Path(scratch)
        # WAL, as a deployed server should run SQLite: it speeds up the one-call-per-point
        # side most, so the ratio measured is, if anything, on the low side.
        with sqlite3.connect(folder / "mlflow.db") as database:
            database.execute("PRAGMA journal_mode=WAL")
        print("starting an MLflow server ...", flush=True)
        with running_server(folder) as url:
            os.environ["MLFLOW_TRACKING_URI"] = url
            requests = _RequestCounter(folder / "server.log")
            results = _measure(args.points, requests)
    _report(args.points, results, args.aim)
    helper, direct = results["helper"], results["direct"]
    return 0 if direct[0] / helper[0] >= args.aim else 1


def _measure(points: int, requests: _RequestCounter) -> dict[str, tuple[float, int]]:
    values = [1.0 / (step + 1) for step in range(points)]
    with tracked_run("bench-tracking", source_dir=ROOT) as run:

        def through_helper() -> None:
            for step, value in enumerate(values):
                run.log_metric("helper_loss", value, step=step)
            run.flush()

        def one_call_each() -> None:
            for step, value in enumerate(values):
                mlflow.log_metric("direct_loss", value, step=step)

        results = {
            "helper": _timed(through_helper, requests),
            "direct": _timed(one_call_each, requests),
        }
    client = MlflowClient()
    for key in ("helper_loss", "direct_loss"):
        stored = len(client.get_metric_history(run.run_id, key))
        if stored != points:
            raise SystemExit(f"{key}: {stored} points stored, {points} logged")
    return results


def _timed(work: Callable[[], None], requests: _RequestCounter) -> tuple[float, int]:
    before = requests.count()
    started = time.perf_counter()
    work()
    took = time.perf_counter() - started
    return took, requests.count() - before


class _RequestCounter:
    """Count the requests in the server's access log, one line each."""

    def __init__(self, log: Path):
        self._log = log

    def count(self) -> int:
        # The server writes its line as it answers; give the last one time to land.
        time.sleep(0.5)
        return len(REQUEST.findall(self._log.read_bytes()))


def _report(points: int, results: dict[str, tuple[float, int]], aim: float) -> None:
    print(f"{points} metric points, one run, one MLflow server on loopback")
    print(f"{'method':<28}{'seconds':>10}{'requests':>10}{'points/s':>12}")
    labels = {"helper": "tracked_run, buffered", "direct": "mlflow.log_metric each"}
    for name, (took, count) in results.items():
        print(f"{labels[name]:<28}{took:>10.2f}{count:>10}{points / took:>12.0f}")
    ratio = results["direct"][0] / results["helper"][0]
    fewer = results["direct"][1] / max(results["helper"][1], 1)
    verdict = "meets" if ratio >= aim else "misses"
    print(f"helper is {ratio:.0f}x faster with {fewer:.0f}x fewer requests ({verdict} {aim:g}x)")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000, help="metric points per method")
    parser.add_argument("--aim", type=float, default=20, help="least speed-up that passes")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
