"""The profiler's and the monitor's memory as batches of rows arrive (thirty-sixth session).

One local Ray session (``ray.init(num_cpus=2)``, the dashboard on: the state API finds the
actors' processes).  An ``@adaptive_remote`` function allocates 50-430 MiB per call, by its
input size; each batch is ``--rows`` calls, then ``raysched.flush()`` (the rows reach the
profiler), the first batch also ``refresh(train=True)``, then a pause of ``--pause-s``.
After each batch the private memory (USS) of every raysched actor process is read.  The
profiler retrains on its own rules (after ``retrain_after_new_rows`` new rows, at most every
``min_retrain_interval_s``), as it does for users; it counts its trainings in ``status()``.

Run:  python benchmarks/bench_actor_memory.py [--batches 30] [--rows 20] [--pause-s 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

import raysched  # noqa: E402

MiB = 2**20


def grow(mib: int) -> int:
    import numpy as np

    block = np.ones(mib * MiB // 4, dtype=np.float32)
    time.sleep(0.05)
    return int(block.nbytes // MiB)


def actor_uss_mib() -> dict[str, float]:
    """Private memory of each live actor's process, by the actor's class name."""
    out = {}
    for actor in list_actors(detail=True):
        if actor.state == "ALIVE" and actor.pid:
            try:
                out[actor.class_name] = round(psutil.Process(actor.pid).memory_full_info().uss / MiB, 1)
            except psutil.Error:
                pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rows", type=int, default=20, help="calls per batch")
    parser.add_argument("--pause-s", type=float, default=3.0, help="wait after each batch")
    parser.add_argument("--json", help="write the readings here")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=True)
    home = tempfile.mkdtemp(prefix="bench-actor-memory-")
    raysched.configure(home=home)
    adaptive = raysched.adaptive_remote(num_cpus=0.5, name="bench_actor_memory.grow")(grow)
    sizes = [50 + (430 - 50) * i // max(1, args.rows - 1) for i in range(args.rows)]
    readings = []
    t0 = time.monotonic()
    for batch in range(args.batches):
        ray.get([adaptive.options(input_size=mib * MiB).remote(mib) for mib in sizes])
        raysched.flush()
        if batch == 0:
            adaptive.refresh(train=True)
        time.sleep(args.pause_s)
        uss = actor_uss_mib()
        readings.append({"batch": batch + 1, "t_s": round(time.monotonic() - t0, 1), "uss_mib": uss})
        print(f"batch {batch + 1:3d} at {readings[-1]['t_s']:6.1f} s: "
              + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in sorted(uss.items())), flush=True)
    from raysched.runtime.profiler import get_or_create_profiler

    status = ray.get(get_or_create_profiler(raysched.get_config()).status.remote())
    trainings = sum(f["trainings"] for f in status["functions"].values())
    print(f"profiler: {status['rows_received']} rows received, {trainings} trainings, "
          f"{status['parts_merged']} store parts merged")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ray": ray.__version__, "readings": readings, "profiler_status": status,
                       "trainings": trainings}, f, indent=1, default=str)
    ray.shutdown()


if __name__ == "__main__":
    main()
