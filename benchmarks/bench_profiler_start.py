"""A profiler starting on a large home: how long its other calls wait while it reads histories.

A profiler (the plain class the Ray actor wraps; no Ray, no MLflow) starts on a home
whose store holds ``--rows`` rows of ``--functions`` functions (written once as the
profiler writes them, parts of 500 rows merged ten at a time, then reused from ``--home``).  It is asked for the first bundle of ``--load`` of them in
turn, each a read of that function's newest rows from the store, while another
thread records one row of another function every 50 ms, as workers do.  Printed:
each first bundle's time, and how long the record calls took meanwhile (median and
worst): a record that waits for a history read holds up the worker batches behind it.

Run:  python benchmarks/bench_profiler_start.py [--rows 300000] [--functions 60] [--load 6]
          [--home /tmp/raysched-bench-big-home]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from raysched.config import RayschedConfig
from raysched.runtime.profiler import Profiler
from raysched.store.profiles import ProfileStore
from raysched.store.schema import new_row_id


def make_rows(n: int, functions: list[str], rng: random.Random, start: int = 0) -> list[dict]:
    """Rows as workers send them: sizes up to 1 GB, peaks following them, one second apart."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(start, start + n):
        size = rng.randint(1, 10**9)
        peak = int(100e6 + size * 0.5 + rng.random() * 50e6)
        wall = 0.5 + rng.random() * 5
        ts = t0 + dt.timedelta(seconds=i)
        rows.append(dict(
            row_id=new_row_id(), function=rng.choice(functions), code_hash="abc123", call_id=uuid.uuid4().hex,
            attempt=1, outcome="ok", timestamp=ts, started_at=ts - dt.timedelta(seconds=wall), node_id="n" * 56,
            worker_pid=rng.randint(1000, 99999), input_size=size, tags=[], arg_shapes=["(1000,)"], dependencies=[],
            priority=0, prediction_source="history", predicted_memory_bytes=peak,
            predicted_memory_upper_bytes=int(peak * 1.2), predicted_cpu=1.0, predicted_wall_seconds=wall,
            allocated_num_cpus=1.0, allocated_memory_bytes=int(peak * 1.3), rung=0, peak_rss_bytes=peak,
            start_rss_bytes=80_000_000, memory_sample_bytes=peak, cpu_seconds=wall * 0.9, cpu_cores=0.9,
            wall_seconds=wall, read_bytes=size, write_bytes=0, read_chars=size, write_chars=10, source="ray", calls=1))
    return rows


def build_home(home: Path, n_rows: int, functions: list[str]) -> None:
    marker = home / f".built-{n_rows}-{len(functions)}"
    if marker.exists():
        return
    shutil.rmtree(home, ignore_errors=True)
    store = ProfileStore(home)
    rng = random.Random(0)
    # As the profiler writes: a part per group commit (a few hundred rows), merged ten at a time.
    for k, start in enumerate(range(0, n_rows, 500)):
        store.append(make_rows(min(500, n_rows - start), functions, rng, start))
        if k % 10 == 9:
            store.tidy(10)
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--functions", type=int, default=60)
    parser.add_argument("--load", type=int, default=6, help="functions whose first bundle is asked for")
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "raysched-bench-big-home"))
    args = parser.parse_args()
    functions = [f"mod.func_{i}" for i in range(args.functions)]
    source = Path(args.home)
    t = time.perf_counter()
    build_home(source, args.rows, functions)
    print(f"home with {args.rows:,} rows of {args.functions} functions ready in {time.perf_counter() - t:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="raysched-bench-start-"))
    shutil.copytree(source, work, dirs_exist_ok=True)
    try:
        # No group-commit wait and no merging: a record call takes what its write and the lock cost.
        # No training either (the recorded rows of "mod.other" would reach a first model).
        profiler = Profiler(RayschedConfig(home=str(work), store_tidy_fanout=0, profile_commit_interval_s=0.0,
                                           min_history_for_model=10**9))
        rng = random.Random(1)
        profiler.record(make_rows(1, ["mod.other"], rng))  # its own history is loaded before the clock starts
        waits: list[float] = []
        done = threading.Event()

        def recorder() -> None:
            i = 0
            while not done.is_set():
                started = time.perf_counter()
                profiler.record(make_rows(1, ["mod.other"], rng, start=10**7 + i))
                waits.append(time.perf_counter() - started)
                i += 1
                time.sleep(0.05)

        thread = threading.Thread(target=recorder)
        thread.start()
        for function in functions[: args.load]:
            started = time.perf_counter()
            bundle = profiler.bundle(function, "abc123")
            print(f"first bundle of {function}: {time.perf_counter() - started:.2f} s ({bundle.n_history} runs)")
        done.set()
        thread.join()
        print(f"record calls of another function meanwhile: {len(waits)}, median "
              f"{statistics.median(waits):.3f} s, worst {max(waits):.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
