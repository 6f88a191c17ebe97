"""``raysched demo``: the learning loop on a local Ray, cold then warm.

A batch of real numpy work whose memory and CPU grow with its input runs twice.
The first round has no history (the fallback sizes every task); between rounds
the profiler takes in what it measured; the second round is sized from those runs
(memory by the cost-aware estimate over them; a model needs 30 runs of a function,
``min_history_for_model``, so 16 tasks train none).  A home that already holds runs
of the demo would size the first round from them: the demo then runs in a new home
under it, so that its first round is cold.
For each task the table shows the predicted and measured memory and CPU; for
each round, how much memory was requested beyond use and how much use went
beyond the request.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .types import MiB


def numpy_work(n_rows: int, n_threads: int) -> float:
    """Memory grows with n_rows (a float64 matrix and its product); CPU with n_threads."""
    from concurrent.futures import ThreadPoolExecutor

    matrix = np.random.default_rng(n_rows).standard_normal((n_rows, 256))
    gram = matrix.T @ matrix  # BLAS may use threads; Python threads below add more

    def chunk(i: int) -> float:
        part = matrix[i::n_threads]
        return float(np.sort(part, axis=0).sum())

    with ThreadPoolExecutor(n_threads) as pool:
        total = sum(pool.map(chunk, range(n_threads)))
    return total + float(gram.trace())


@dataclass(frozen=True)
class RoundResult:
    name: str
    table: list[tuple]
    over_gib: float
    under_tasks: int
    seconds: float
    #: The largest shortfall of a task's request below its peak (MiB), and as a share of that request.
    under_worst_mib: float = 0.0
    under_worst_share: float = 0.0


def allocation_summary(allocated_and_peak: list[tuple[float, float]]) -> tuple[float, int, float, float]:
    """Over-allocation (GiB summed over tasks), the tasks whose peak passed their request, and the
    largest such shortfall in MiB and as a share of its request, from (allocated, peak) bytes."""
    over = sum(max(0.0, alloc - peak) for alloc, peak in allocated_and_peak) / 2**30
    short = [(peak - alloc, alloc) for alloc, peak in allocated_and_peak if peak > alloc]
    worst, request = max(short, default=(0.0, 0.0))
    return over, len(short), worst / MiB, (worst / request if request > 0 else 0.0)


def _round(name: str, work, sizes: list[tuple[int, int]]) -> RoundResult:
    import ray

    import raysched

    start = time.perf_counter()
    refs = [work.options(input_size=n * 256 * 8).remote(n, t) for n, t in sizes]
    ray.get(refs)
    seconds = time.perf_counter() - start
    rows = raysched.profiles(work).tail(len(sizes))
    # Rows land in the order tasks finished: match them to tasks by input size.
    by_size = {int(r["input_size"]): r for _, r in rows.iterrows()}
    table, allocated_and_peak = [], []
    for n, t in sizes:
        row = by_size[n * 256 * 8]
        peak = float(row["peak_rss_bytes"])
        alloc = float(row["allocated_memory_bytes"])
        allocated_and_peak.append((alloc, peak))
        table.append((n, t, str(row["prediction_source"]), float(row["predicted_memory_upper_bytes"]) / MiB,
                      alloc / MiB, peak / MiB, float(row["predicted_cpu"]), float(row["allocated_num_cpus"]),
                      float(row["cpu_cores"] or 0.0)))
    over, under, worst_mib, worst_share = allocation_summary(allocated_and_peak)
    return RoundResult(name, table, over, under, seconds, worst_mib, worst_share)


#: The name the demo's function is registered under.
DEMO_FUNCTION = "raysched.demo.numpy_work"


def home_for_a_cold_start(home: Path, runs_there: int, now: float) -> Path:
    """``home``, or a new folder under it when it already holds ``runs_there`` runs of the demo."""
    if runs_there == 0:
        return home
    return home / "demo-runs" / time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))


def _mlflow_runs(db: Path) -> int:
    """Runs in an MLflow SQLite store (0 if there is none: the profiler may create the file
    before it trains anything)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    except sqlite3.Error:
        return 0


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Raise ConnectionError at once when ``address`` is a ``host:port`` where nothing listens:
    Ray's ``ray.init`` retries such an address for minutes, printing warnings (a mistyped
    port or a head that is down looked like a hung demo).  ``auto`` and other forms are
    left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or type(exc).__name__}); "
                              "is a Ray head running there (`ray start --head`)?") from None


def run_demo(tasks: int = 16, seed: int = 0, echo=print, address: str = "local") -> list[RoundResult]:
    """Run the demo; returns both rounds (the CLI prints them, tests check them).

    ``address``: where to run when Ray is not initialised yet: ``"local"`` starts a new
    local cluster, whatever ``RAY_ADDRESS`` or an earlier ``ray start`` left behind (Ray's
    own default would join those, and wait minutes on one that has died); ``"auto"`` or an
    address joins that cluster.
    """
    import ray

    import raysched

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started_ray = not ray.is_initialized()
    if started_ray:
        from .store.profiles import ProfileStore

        home = raysched.get_config().home_path
        earlier = len(ProfileStore(home, writable=False).read(function=DEMO_FUNCTION))
        fresh = home_for_a_cold_start(home, earlier, time.time())
        if fresh != home:
            echo(f"{home} already holds {earlier} runs of the demo; this run uses a new home, {fresh},"
                 " so that its first round is cold.")
            raysched.configure(home=str(fresh))
        ProfileStore(fresh)  # an unwritable home says so now, not after Ray has started
        if address == "local":
            echo("Starting a local Ray cluster...")
            ray.init(address="local", include_dashboard=False, namespace="raysched", log_to_driver=False)
        else:
            check_reachable(address)
            echo(f"Joining the Ray cluster at {address}...")
            ray.init(address=address, namespace="raysched", log_to_driver=False)
    config = raysched.get_config()
    work = raysched.adaptive_remote(name=DEMO_FUNCTION)(numpy_work)
    rng = np.random.default_rng(seed)
    sizes = [(int(n), int(t)) for n, t in zip(rng.integers(20_000, 200_000, tasks), rng.integers(1, 3, tasks))]
    results = []
    try:
        results.append(_round("cold", work, sizes))
        echo("Training on the cold round's profiles...")
        work.refresh(train=True)
        results.append(_round("warm", work, sizes))
    finally:
        if started_ray:
            ray.shutdown()
    for result in results:
        echo("")
        echo(f"Round {result.name} ({result.seconds:.1f} s)")
        echo(f"{'rows':>8} {'thr':>3} {'source':>10} {'upper MiB':>9} {'alloc MiB':>9} {'peak MiB':>9}"
             f" {'pred CPU':>8} {'alloc CPU':>9} {'used CPU':>8}")
        for n, t, source, pred_mem, alloc, peak, pred_cpu, alloc_cpu, used_cpu in result.table:
            echo(f"{n:>8} {t:>3} {source:>10} {pred_mem:>9.0f} {alloc:>9.0f} {peak:>9.0f}"
                 f" {pred_cpu:>8.2f} {alloc_cpu:>9.2f} {used_cpu:>8.2f}")
        echo(f"  over-allocation: {result.over_gib:.2f} GiB of memory requested beyond peak use, summed over tasks;"
             f" under-allocation: {result.under_tasks} of {len(result.table)} tasks used more than requested"
             + (f" (the most: {result.under_worst_mib:.0f} MiB, {result.under_worst_share:.1%} of its request)"
                if result.under_tasks else ""))
    if len(results) == 2 and results[0].over_gib > 0:
        echo(f"\nWarm over-allocation is {results[1].over_gib / results[0].over_gib:.0%} of cold;"
             f" under-allocated tasks: {results[0].under_tasks} cold, {results[1].under_tasks} warm.")
    echo(f"\nProfiles (Parquet): {config.home_path / 'profiles'}")
    echo(f"Read them with:     raysched profiles --home {config.home_path}   (the monitor's decisions:"
         f" raysched events --home {config.home_path})")
    if _mlflow_runs(config.home_path / "mlflow.db"):
        echo(f"MLflow runs:        mlflow ui --backend-store-uri sqlite:///{config.home_path / 'mlflow.db'}")
    else:
        echo(f"MLflow runs:        none yet: a model is trained once a function has {config.min_history_for_model}"
             f" runs (min_history_for_model); then in {config.home_path / 'mlflow.db'}")
    return results
