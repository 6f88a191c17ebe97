"""Throughput of tiny tasks: ``@raysched.adaptive_remote`` against plain ``@ray.remote`` (issue 2).

One Ray session (``num_cpus=2``), one fresh ``RAYSCHED_HOME``, three paths side by
side: plain Ray, raysched as configured by default (a worker measures one call in
``short_call_measure_every`` of a function whose calls proved tiny, at most one
each ``short_call_measure_gap_s``, and counts the others: ``policy/thinning.py``),
and raysched with ``measure_every_call=True`` (a full measurement and a row for
every call).  Every path is warmed up first
(worker processes started, functions exported, raysched's profiler actor
created, its models trained and the driver's first bundle fetched), so the
figures are steady state.  Then, ``--repeats`` times, with the order of the
paths rotated each repetition so that drift in the machine's load hits all:

* all at once: ``--tasks`` calls of ``return x + 1`` submitted in a list
  comprehension, then one ``ray.get`` of all refs: tasks/s, and the time of the
  submit loop alone (driver-side cost per call);
* one by one: submit one, ``ray.get`` it, ``--sequential-tasks`` times:
  tasks/s and latency per task;
* sustained: batches of ``--tasks`` back to back for ``--sustained-s`` seconds:
  tasks/s with raysched's background work (rows stored, parts merged,
  retraining) competing for the cores, as in a long pipeline.

After each raysched run the script waits for the profiler to have stored every
row and finished any retraining the run started, so that raysched's background
work does not spill into the next (possibly plain) run; that wait is reported
as "background tail" and is not counted in the all-at-once and one-by-one
throughputs (it is in the sustained one).

Run:  python benchmarks/bench_throughput.py [--tasks 2000] [--repeats 5]
          [--sequential-tasks 500] [--sustained-s 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

# Ray >= 2.60 turns token authentication on for a new local cluster unless told otherwise.
os.environ["RAY_AUTH_MODE"] = "disabled"
_HOME = tempfile.mkdtemp(prefix="raysched-bench-")
os.environ["RAYSCHED_HOME"] = _HOME

import ray  # noqa: E402

import raysched  # noqa: E402


@ray.remote
def plain_inc(x):
    return (x if isinstance(x, int) else len(x)) + 1


@raysched.adaptive_remote
def raysched_inc(x):
    return (x if isinstance(x, int) else len(x)) + 1


@raysched.adaptive_remote(measure_every_call=True)
def raysched_every_inc(x):
    return (x if isinstance(x, int) else len(x)) + 1


#: What call i passes: ``i`` (the default, ``--inputs scalars``), or with ``--inputs arrays``
#: a float64 array of 1..50,000 elements (seeded), so that every call has its own input
#: size and raysched predicts for it (the plan cache of scalar calls does not help).
_ARRAYS: list = []


def arg(i: int):
    return _ARRAYS[i % len(_ARRAYS)] if _ARRAYS else i


def expected(i: int) -> int:
    return (len(_ARRAYS[i % len(_ARRAYS)]) if _ARRAYS else i) + 1


def use_arrays(seed: int = 0, count: int = 4096) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    _ARRAYS[:] = [np.ones(int(n)) for n in rng.integers(1, 50_001, size=count)]


PATHS = {"plain": plain_inc, "raysched": raysched_inc, "raysched_every": raysched_every_inc}
#: The raysched paths, each compared with plain.
ARMS = ("raysched", "raysched_every")


# --- CPU accounting: every process of this session ---------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
_MARK = f"RAYSCHED_HOME={_HOME}".encode()


def _group(pid: int, cmdline: bytes) -> str:
    if pid == os.getpid():
        return "driver"
    if b"ray::Profiler" in cmdline:
        return "profiler"
    if b"default_worker.py" in cmdline or (cmdline.startswith(b"ray::") and b"Agent" not in cmdline):
        return "workers"
    return "ray_system"  # raylet, GCS, agents, log monitor


def session_cpu() -> dict[str, float]:
    """CPU seconds (user + system) used so far by the processes of this Ray session, by group.

    A process belongs to the session when it inherited this script's RAYSCHED_HOME (every
    process the local cluster starts does).  A worker that exited between two readings takes
    its CPU with it: these figures are a lower bound, good for comparing runs.
    """
    totals = {"driver": 0.0, "workers": 0.0, "profiler": 0.0, "ray_system": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if pid != os.getpid():
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if _MARK not in f.read().split(b"\0"):
                        continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone, or not ours to read
            continue
        totals[_group(pid, cmdline)] += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
    """CPU milliseconds per task, by group and in total."""
    out = {f"cpu_ms_per_task_{k}": max(0.0, after[k] - before[k]) / tasks * 1e3 for k in before}
    out["cpu_ms_per_task_total"] = sum(out.values())
    return out


# --- the measurements -------------------------------------------------------------------------------


def run_batch(fn, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    refs = [fn.remote(arg(i)) for i in range(n)]
    t1 = time.perf_counter()
    values = ray.get(refs)
    t2 = time.perf_counter()
    assert values[-1] == expected(n - 1), values[-1]
    return {
        "batch_tasks_per_s": n / (t2 - t0),
        "batch_seconds": t2 - t0,
        "submit_us_per_call": (t1 - t0) / n * 1e6,
    }


def run_sequential(fn, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    for i in range(n):
        assert ray.get(fn.remote(arg(i))) == expected(i)
    t1 = time.perf_counter()
    return {"seq_tasks_per_s": n / (t1 - t0), "seq_latency_ms": (t1 - t0) / n * 1e3}


def run_sustained(fn, n: int, seconds: float) -> dict[str, float]:
    """Batches of ``n`` back to back for ``seconds``: raysched's background work (rows stored,
    parts merged, retraining) competes with the tasks, as in a long pipeline."""
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        values = ray.get([fn.remote(arg(i)) for i in range(n)])
        assert values[-1] == expected(n - 1), values[-1]
        done += n
    return {"sustained_tasks_per_s": done / (time.perf_counter() - t0)}


def profiler_handle():
    from raysched.runtime.client import get_client

    return get_client().handle


def quiesce() -> float:
    """Wait until the profiler has stored every row in flight and finished training; seconds waited."""
    t0 = time.perf_counter()
    handle = profiler_handle()
    # Rows are flushed by the workers flush_interval_s (0.2 s) after a burst; wait past that.
    ray.get(handle.settle.remote(min_wait_s=0.5, quiet_s=0.5, timeout_s=60.0))
    ray.get(handle.wait_for_training.remote(timeout_s=120.0))
    return time.perf_counter() - t0


def warm_up(n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    for fn in PATHS.values():
        ray.get([fn.remote(arg(i)) for i in range(n)])  # workers started, functions exported
        for i in range(20):
            ray.get(fn.remote(arg(i)))
    # raysched: enough rows for the model, trained and registered (MLflow imported in the
    # actor), and the driver holds a bundle with the models in it.
    for fn in (raysched_inc, raysched_every_inc):
        fn.refresh(train=True, timeout=300)
    quiesce()
    for _ in range(2):  # one more round of rows, so refreshes happen as in steady state
        for fn in (raysched_inc, raysched_every_inc):
            ray.get([fn.remote(arg(i)) for i in range(n)])
        quiesce()
    return time.perf_counter() - t0


def one_path(name: str, tasks: int, seq_tasks: int, sustained_s: float = 0.0) -> dict[str, float]:
    fn = PATHS[name]
    cpu0 = session_cpu()
    result = run_batch(fn, tasks)
    if name in ARMS:
        result["batch_tail_s"] = quiesce()
    # CPU of the all-at-once run, including raysched's background tail (rows stored, retraining)
    result.update(cpu_delta(cpu0, session_cpu(), tasks))
    result.update(run_sequential(fn, seq_tasks))
    if name in ARMS:
        result["seq_tail_s"] = quiesce()
    if sustained_s > 0:
        result.update(run_sustained(fn, tasks, sustained_s))
        if name in ARMS:
            quiesce()
    return result


# --- reporting -------------------------------------------------------------------------------------------


METRICS = [
    # key, label, higher-is-better
    ("batch_tasks_per_s", "all at once: tasks/s", True),
    ("submit_us_per_call", "all at once: submit loop, us/call", False),
    ("sustained_tasks_per_s", "sustained (back to back): tasks/s", True),
    ("seq_tasks_per_s", "one by one: tasks/s", True),
    ("seq_latency_ms", "one by one: latency, ms/task", False),
    ("cpu_ms_per_task_total", "all at once: CPU ms/task, all procs", False),
    ("cpu_ms_per_task_driver", "  of which driver", False),
    ("cpu_ms_per_task_workers", "  of which workers", False),
    ("cpu_ms_per_task_profiler", "  of which profiler actor", False),
    ("cpu_ms_per_task_ray_system", "  of which raylet/GCS/agents", False),
]


ARM_LABELS = {
    "raysched": "the default: calls that proved tiny are thinned, one in short_call_measure_every measured, "
                "at most one per short_call_measure_gap_s",
    "raysched_every": "measure_every_call=True: every call measured, a row each",
}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 1.0


def summarise(runs: list[dict[str, dict[str, float]]], arm: str = "raysched") -> dict:
    """Figures of one raysched path (``arm``) against plain."""
    summary: dict = {}
    for key, _, _ in METRICS:
        if key not in runs[0]["plain"]:
            continue  # not measured in this run (--sustained-s 0)
        plain = [r["plain"][key] for r in runs]
        rs = [r[arm][key] for r in runs]
        summary[key] = {
            "plain_median": statistics.median(plain),
            "raysched_median": statistics.median(rs),
            "ratio_of_medians": _ratio(statistics.median(rs), statistics.median(plain)),
            # per repetition, the paths ran back to back: the median of the paired ratios
            "median_paired_ratio": statistics.median(_ratio(b, a) for a, b in zip(plain, rs)),
            "plain": plain,
            "raysched": rs,
        }
    added = [r[arm]["seq_latency_ms"] - r["plain"]["seq_latency_ms"] for r in runs]
    summary["added_latency_ms"] = {"median_paired": statistics.median(added), "per_repeat": added}
    added_submit = [r[arm]["submit_us_per_call"] - r["plain"]["submit_us_per_call"] for r in runs]
    summary["added_submit_us_per_call"] = {"median_paired": statistics.median(added_submit), "per_repeat": added_submit}
    summary["background_tail_s"] = {
        "batch_median": statistics.median(r[arm]["batch_tail_s"] for r in runs),
        "seq_median": statistics.median(r[arm]["seq_tail_s"] for r in runs),
    }
    return summary


def print_table(summary: dict, args: argparse.Namespace, arm: str = "raysched") -> None:
    print()
    print(f"[{arm}: {ARM_LABELS[arm]}]")
    print(f"tiny tasks (return x + 1); all at once: {args.tasks} tasks, one by one: {args.sequential_tasks} tasks; "
          f"medians of {args.repeats} interleaved repetitions")
    print("ratio = raysched/plain of the medians; paired = median over repetitions of the same ratio "
          "(plain and raysched ran back to back)")
    header = f"{'metric':<36} {'plain':>10} {'raysched':>10} {'ratio':>7} {'paired':>7}"
    print(header)
    print("-" * len(header))
    for key, label, _ in METRICS:
        if key not in summary:
            continue
        s = summary[key]
        fmt = ".3f" if key.startswith("cpu_") else ".1f"
        print(f"{label:<36} {s['plain_median']:>10{fmt}} {s['raysched_median']:>10{fmt}} "
              f"{s['ratio_of_medians']:>7.2f} {s['median_paired_ratio']:>7.2f}")
    print("-" * len(header))
    print(f"added latency per task (one by one, median of paired differences): "
          f"{summary['added_latency_ms']['median_paired']:.2f} ms")
    print(f"added driver submit cost per call (median of paired differences): "
          f"{summary['added_submit_us_per_call']['median_paired']:.0f} us")
    print(f"raysched background tail after a run (not counted above): all at once "
          f"{summary['background_tail_s']['batch_median']:.2f} s, one by one "
          f"{summary['background_tail_s']['seq_median']:.2f} s")
    goal = summary["batch_tasks_per_s"]["ratio_of_medians"]
    print(f"goal (all at once, raysched/plain >= 0.8): {goal:.2f} -> {'met' if goal >= 0.8 else 'NOT met'}")
    if "sustained_tasks_per_s" in summary:
        held = summary["sustained_tasks_per_s"]["ratio_of_medians"]
        print(f"sustained for {args.sustained_s:g} s, raysched/plain: {held:.2f} -> {'met' if held >= 0.8 else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks submitted all at once (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--sequential-tasks", type=int, default=500,
                        help="tasks submitted one by one, each awaited (default 500)")
    parser.add_argument("--warmup-tasks", type=int, default=200, help="tasks per path in the warm-up (default 200)")
    parser.add_argument("--retrain-after-rows", type=int, default=None, metavar="N",
                        help="diagnostic: set raysched's retrain_after_new_rows (default: raysched's own, 20); "
                             "a large N keeps the profiler from retraining during the measured runs")
    parser.add_argument("--inputs", choices=("scalars", "arrays"), default="scalars",
                        help="what each call passes: its index (default), or a numpy array of its own size")
    parser.add_argument("--sustained-s", type=float, default=5.0, metavar="S",
                        help="also run batches of --tasks back to back for S seconds per path, background work "
                             "included (default 5; 0: skip)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    args = parser.parse_args(argv)
    if args.inputs == "arrays":
        use_arrays()
    if min(args.tasks, args.repeats, args.sequential_tasks, args.warmup_tasks) < 1:
        parser.error("counts must be positive")

    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False)
    if args.retrain_after_rows is not None:
        raysched.configure(retrain_after_new_rows=args.retrain_after_rows)
    try:
        warm_s = warm_up(args.warmup_tasks)
        print(f"warm-up done in {warm_s:.1f} s (workers started, functions exported, "
              f"profiler created, model trained, bundle fetched)", file=sys.stderr)
        runs = []
        names = list(PATHS)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotated each repetition
            run = {name: one_path(name, args.tasks, args.sequential_tasks, args.sustained_s) for name in order}
            runs.append(run)
            print(f"repeat {rep + 1}/{args.repeats} ({' then '.join(order)}): "
                  + "; ".join(f"{n} {run[n]['batch_tasks_per_s']:.0f}/s batch, "
                              f"{run[n]['seq_latency_ms']:.2f} ms seq" for n in names),
                  file=sys.stderr)
        profiler = profiler_handle()  # held: Ray 2.40 lost a handle made inline
        status = ray.get(profiler.status.remote())
    finally:
        ray.shutdown()
        shutil.rmtree(_HOME, ignore_errors=True)
    summaries = {arm: summarise(runs, arm) for arm in ARMS}
    for arm in ARMS:
        print_table(summaries[arm], args, arm)
    summary = summaries["raysched"]
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)}; cpus: {os.cpu_count()}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "args": vars(args),
                "python": platform.python_version(),
                "ray": ray.__version__,
                "raysched": raysched.__version__,
                "cpus": os.cpu_count(),
                "load_before": load_before,
                "load_after": load_after,
                "warmup_s": warm_s,
                "profiler_status": status,
                "summary": summary,
                "summary_every_call_measured": summaries["raysched_every"],
                "runs": runs,
            }, out, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
