"""The admission queue at scale: a big burst of tiny calls with a ``priority`` (issue 2, "Priorities").

One Ray session (``num_cpus=2``), one fresh ``RAYSCHED_HOME``.  ``--calls`` calls of
``return x + 1`` are submitted at once, then one ``ray.get`` of all refs, four ways,
in a rotated order each repetition:

* ``plain``: plain ``@ray.remote``;
* ``no_priority``: ``@adaptive_remote`` without a priority (straight to Ray);
* ``queued``: ``.options(priority=i % 7)``, through the admission queue as configured by
  default (short calls admitted ahead of their room, ``admission_pipeline_s``);
* ``queued_strict``: the same with ``admission_pipeline_s=0`` (a call is admitted only once
  its room is free: one round trip per call).

For each: the whole time, the submit loop's time, the CPU seconds of the driver and of
the admission actor, and the driver's and the actor's resident memory after the run.
Every path is warmed up first (the function's wall time is known, so calls may be
admitted ahead).  Medians over ``--repeats``.

Run:  python benchmarks/bench_queue_scale.py [--calls 10000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAYSCHED_HOME"] = tempfile.mkdtemp(prefix="raysched-bench-queue-")

import psutil  # noqa: E402
import ray  # noqa: E402

import raysched  # noqa: E402
from raysched import adaptive_remote  # noqa: E402
from raysched.runtime.admission import ADMISSION_NAME  # noqa: E402
from raysched.runtime.session import NAMESPACE  # noqa: E402


@adaptive_remote
def tiny(x):
    return x + 1


@ray.remote
def plain_tiny(x):
    return x + 1


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    pipeline_s = raysched.get_config().admission_pipeline_s
    # Warm up: workers, the profiler's model of tiny's wall time, the admission actor.
    for _ in range(3):
        ray.get([tiny.remote(i) for i in range(300)] + [plain_tiny.remote(i) for i in range(300)])
    raysched.flush()
    ray.get([tiny.options(priority=0).remote(i) for i in range(300)])
    actor = ray.get_actor(ADMISSION_NAME, namespace=NAMESPACE)
    actor_process = psutil.Process(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))
    driver = psutil.Process()
    wall = tiny.options(priority=0).predict(1).wall
    print(f"tiny's predicted wall time: {wall.upper * 1e3:.3f} ms upper ({wall.source}, {wall.n_history} runs)")

    submit = {
        "plain": lambda i: plain_tiny.remote(i),
        "no_priority": lambda i: tiny.remote(i),
        "queued": lambda i: tiny.options(priority=i % 7).remote(i),
        "queued_strict": lambda i: tiny.options(priority=i % 7).remote(i),
    }
    runs: dict[str, list[dict]] = {name: [] for name in submit}
    names = list(submit)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            # The admission actor takes the settings of the driver that configures raysched.
            raysched.configure(admission_pipeline_s=0.0 if name == "queued_strict" else pipeline_s)
            if name.startswith("queued"):
                ray.get(tiny.options(priority=0).remote(0))  # the actor has the new setting
                assert ray.get(actor.status.remote())["pipeline_s"] == (0.0 if name == "queued_strict" else pipeline_s)
            gc.collect()
            driver_cpu, actor_cpu = _cpu(driver), _cpu(actor_process)
            started = time.perf_counter()
            refs = [submit[name](i) for i in range(args.calls)]
            submitted = time.perf_counter() - started
            values = ray.get(refs, timeout=900)
            seconds = time.perf_counter() - started
            assert values == [i + 1 for i in range(args.calls)], name
            del refs, values
            run = {"seconds": seconds, "submit_seconds": submitted,
                   "driver_cpu_s": _cpu(driver) - driver_cpu, "admission_cpu_s": _cpu(actor_process) - actor_cpu,
                   "driver_rss_mib": driver.memory_info().rss / 2**20,
                   "admission_rss_mib": actor_process.memory_info().rss / 2**20}
            runs[name].append(run)
            print(f"repeat {repeat} {name:13s}: {seconds:6.1f} s (submit {submitted:4.1f} s), CPU driver "
                  f"{run['driver_cpu_s']:5.1f} s, admission actor {run['admission_cpu_s']:5.1f} s; "
                  f"RSS driver {run['driver_rss_mib']:.0f} MiB, actor {run['admission_rss_mib']:.0f} MiB", flush=True)

    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print(f"\nmedians over {args.repeats} repetitions of {args.calls} calls (pipeline_s={pipeline_s}):")
    for name, m in medians.items():
        print(f"  {name:13s}: {m['seconds']:6.1f} s, x{m['seconds'] / medians['plain']['seconds']:.2f} of plain "
              f"Ray; admission actor CPU {m['admission_cpu_s']:.1f} s")
    print(f"  queued / queued_strict: {medians['queued']['seconds'] / medians['queued_strict']['seconds']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "repeats": args.repeats, "pipeline_s": pipeline_s,
                       "runs": runs, "medians": medians}, f, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
