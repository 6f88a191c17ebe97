"""How long a task's first run in a worker process waits before its body starts.

Ray's state API says when a task began ``RUNNING`` in its worker; the body returns the
time it began.  The difference is what the worker did first: Ray's own setup of the
function, and for raysched its wrapper (the measurement, the driver's config).  Two cases,
each in worker processes of their own (a ``runtime_env`` env var per repetition):

- a **fresh** worker process: plain ``@ray.remote`` against ``@adaptive_remote``;
- a worker that has run **plain** tasks only: its first raysched call, and the next one.

    python benchmarks/bench_first_call.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.60: token auth on a new local cluster otherwise
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAYSCHED_HOME", tempfile.mkdtemp(prefix="raysched-bench-first-call-"))

import ray  # noqa: E402

import raysched  # noqa: E402


def body() -> float:
    import time

    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=True)  # the state API needs the dashboard
    from ray.util.state import list_tasks

    plain = ray.remote(body)
    adaptive = raysched.adaptive_remote(name="bench_first_call.body", memory=100 * 2**20, num_cpus=1)(body)
    ray.get(adaptive.remote())  # raysched's actors up, its function known
    runs: list[tuple[str, str, float]] = []
    for i in range(args.repeats):
        fresh_plain = {"env_vars": {"BENCH_FIRST_CALL": f"fresh-plain-{i}"}}
        fresh_adaptive = {"env_vars": {"BENCH_FIRST_CALL": f"fresh-adaptive-{i}"}}
        plain_warm = {"env_vars": {"BENCH_FIRST_CALL": f"plain-warm-{i}"}}
        cases = [("fresh worker: plain", plain, fresh_plain), ("fresh worker: raysched", adaptive, fresh_adaptive),
                 (None, plain, plain_warm),  # the worker runs a plain task first
                 ("plain-warm worker: raysched, first", adaptive, plain_warm),
                 ("plain-warm worker: raysched, next", adaptive, plain_warm)]
        for j, (case, fn, env) in enumerate(cases):
            name = f"bench_first_call_{i}_{j}"
            started = ray.get(fn.options(num_cpus=1, name=name, runtime_env=env).remote())
            if case is not None:
                runs.append((case, name, started))
    time.sleep(3)  # task events reach the GCS in batches
    delays: dict[str, list[float]] = {}
    for case, name, started in runs:
        task = list_tasks(filters=[("name", "=", name)], detail=True, raise_on_missing_output=False)
        states = {e["state"]: e["created_ms"] / 1000 for e in (task[0].events or [])} if task else {}
        if "RUNNING" in states:
            delays.setdefault(case, []).append(started - states["RUNNING"])
    print(f"seconds from RUNNING to the body's start, median of {args.repeats} (all):")
    for case, values in delays.items():
        print(f"  {case:38s} {statistics.median(values):.3f}  ({', '.join(f'{v:.3f}' for v in values)})")
    ray.shutdown()


if __name__ == "__main__":
    main()
