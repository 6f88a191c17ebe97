"""Driver-side cost of common submission shapes: plain ``@ray.remote`` against raysched.

Three cases, each with plain Ray and ``@raysched.adaptive_remote`` side by side in one
Ray session (``num_cpus=2``, ``RAY_AUTH_MODE=disabled``, a fresh temporary
``RAYSCHED_HOME``):

* ``shared-ref``: every call takes the same ``ray.put`` array (a model or a table
  shared by a batch). raysched derives the call's input size from Ray's record of
  the object, a round trip to its owner, which it now makes once per object.
* ``options``: every call passes ``.options(runtime_env={...})``, a dict option, built
  anew per call. raysched keys its plan cache on the options' values, so equal
  options find the plan made for the first call.
* ``pending-ref``: every call takes the output of a task still running (a chain, a
  reduction over running tasks): an object with no size yet. raysched asked its owner
  for the size on every call (a round trip each) until the twenty-first session; it now
  asks the driver's own core worker. Only the submit loop's time means something here:
  every run's ``ray.get`` waits for that task (``PENDING_S``).
* ``file-paths``: every call takes the path of a file of its own (sparse files of
  log-uniform sizes from 1 to 100 MB, never passed twice: a batch over a folder of
  inputs). raysched sizes the call from the file, and a size never repeats: it made
  a plan per call until the twenty-second session; calls whose sizes fall in one
  band (~1.4% wide) now share one.
* ``names``: every call is given a task name of its own (``.options(name=f"item-{i}")``,
  for the dashboard). raysched made a plan per name until the twenty-second session;
  calls that differ only in their name now share one.

Per case and path: ``--calls`` submissions in a list comprehension (the submit loop's
time per call), then one ``ray.get`` of all refs (tasks/s over both), ``--repeats``
times, the paths alternating; medians, and raysched/plain.

Run:  python benchmarks/bench_submit_paths.py [--calls 1000] [--repeats 5] [--cases a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
_HOME = tempfile.mkdtemp(prefix="raysched-bench-")
os.environ["RAYSCHED_HOME"] = _HOME

import numpy as np  # noqa: E402
import ray  # noqa: E402

import raysched  # noqa: E402


@ray.remote
def plain_first(a):
    return float(a[0])


@raysched.adaptive_remote
def raysched_first(a):
    return float(a[0])


@ray.remote
def plain_echo(x):
    return x


@raysched.adaptive_remote
def raysched_echo(x):
    return x


#: How long the task whose output the pending-ref case passes runs (from the start of a run).
PENDING_S = 0.5


@ray.remote
def made_later(seconds):
    time.sleep(seconds)
    return 1


def env() -> dict:
    return {"env_vars": {"RAYSCHED_BENCH": "1"}}


@ray.remote
def plain_name_length(path):
    return len(path)


@raysched.adaptive_remote
def raysched_name_length(path):
    return len(path)


class InputFiles:
    """Sparse files of log-uniform sizes in a temporary folder, each handed out once."""

    def __init__(self, count: int, folder: str, seed: int = 0):
        rng = np.random.default_rng(seed)
        os.makedirs(folder, exist_ok=True)
        self.paths = []
        for i, size in enumerate(np.exp(rng.uniform(np.log(1e6), np.log(1e8), count)).astype(int)):
            path = os.path.join(folder, f"input-{i:06d}.bin")
            with open(path, "wb") as f:
                f.truncate(int(size))
            self.paths.append(path)
        self.next = 0

    def take(self) -> str:
        path = self.paths[self.next]
        self.next += 1
        return path


def cases(shared: ray.ObjectRef, pending: list, files: InputFiles) -> dict[str, dict[str, object]]:
    """case -> path -> a function of the call's index that submits it (``pending[0]``: the
    ref of a task still running, made anew before each run)."""
    return {
        "shared-ref": {"plain": lambda i: plain_first.remote(shared),
                       "raysched": lambda i: raysched_first.remote(shared)},
        "options": {"plain": lambda i: plain_echo.options(runtime_env=env()).remote(i),
                    "raysched": lambda i: raysched_echo.options(runtime_env=env()).remote(i)},
        "pending-ref": {"plain": lambda i: plain_echo.remote(pending[0]),
                        "raysched": lambda i: raysched_echo.remote(pending[0])},
        "names": {"plain": lambda i: plain_echo.options(name=f"item-{i}").remote(i),
                  "raysched": lambda i: raysched_echo.options(name=f"item-{i}").remote(i)},
        "file-paths": {"plain": lambda i: plain_name_length.remote(files.take()),
                       "raysched": lambda i: raysched_name_length.remote(files.take())},
    }


def one_run(submit, calls: int, pending: list) -> dict[str, float]:
    pending[0] = made_later.remote(PENDING_S)
    t0 = time.perf_counter()
    refs = [submit(i) for i in range(calls)]
    t1 = time.perf_counter()
    ray.get(refs)
    t2 = time.perf_counter()
    return {"submit_us_per_call": (t1 - t0) / calls * 1e6, "tasks_per_s": calls / (t2 - t0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="submissions per run (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per case and path (default 5)")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument("--cases", default="", help="comma-separated cases to run (default: all)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("counts must be positive")
    ray.init(num_cpus=2, include_dashboard=False)
    out: dict[str, object] = {"command": " ".join(sys.argv), "calls": args.calls, "repeats": args.repeats,
                              "load_before": os.getloadavg(), "cases": {}}
    try:
        shared = ray.put(np.ones(100_000))
        pending = [made_later.remote(0)]
        # One file per call of every run and warm-up of the file-paths case (both paths).
        files = InputFiles(2 * (200 + args.calls * args.repeats), os.path.join(_HOME, "inputs"))
        chosen = cases(shared, pending, files)
        unknown = set(filter(None, args.cases.split(","))) - set(chosen)
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}: choose from {sorted(chosen)}")
        for case, paths in chosen.items():
            if args.cases and case not in args.cases.split(","):
                continue
            for submit in paths.values():  # warm-up: workers, exported functions, the first plan
                ray.get([submit(i) for i in range(200)])
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for rep in range(args.repeats):
                order = list(paths) if rep % 2 == 0 else list(reversed(paths))
                for name in order:
                    runs[name].append(one_run(paths[name], args.calls, pending))
            summary = {}
            for key in ("submit_us_per_call", "tasks_per_s"):
                medians = {name: statistics.median(r[key] for r in runs[name]) for name in paths}
                summary[key] = {**medians, "ratio": medians["raysched"] / medians["plain"]}
            out["cases"][case] = {"runs": runs, "summary": summary}  # type: ignore[index]
            s = summary
            print(f"{case:10s} submit us/call: plain {s['submit_us_per_call']['plain']:.0f}, raysched "
                  f"{s['submit_us_per_call']['raysched']:.0f} (x{s['submit_us_per_call']['ratio']:.2f}); tasks/s: "
                  f"plain {s['tasks_per_s']['plain']:.0f}, raysched {s['tasks_per_s']['raysched']:.0f} "
                  f"({s['tasks_per_s']['ratio']:.2f} of plain); medians of {args.repeats}")
    finally:
        ray.shutdown()
        shutil.rmtree(_HOME, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
