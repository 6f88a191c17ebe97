"""The admission queue's memory while calls wait (issue 2, "Priorities").

One Ray session (``num_cpus=1``).  The queue is raysched's own admission actor class
(``runtime.admission.Admission``) behind ``ray.remote``, as ``get_or_create_admission``
makes it, but over a fixed capacity of one CPU, so that every call but the first waits:
for each count in ``--waiting``, that many ``admit`` calls of one CPU each are sent at
once, and once the actor holds them all (its ``status()``), the resident memory of the
actor's and of the driver's processes is read.  The counts add up (the calls of the first
count still wait while the next are sent).  Then ``--slots`` (the actor's
``max_concurrency``) is checked: with that many slots and two calls more than it, does an
``ended`` still get through?

Run:  python benchmarks/bench_queue_memory.py [--waiting 20000,60000] [--slots 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import ray  # noqa: E402

from raysched.policy.admission import Request  # noqa: E402
from raysched.runtime.admission import ADMISSION_MAX_WAITING, Admission  # noqa: E402


def one_cpu() -> dict[str, Request]:
    return {"node": Request(1.0, 1e12)}


def no_dead_jobs(jobs: set[str]) -> set[str]:
    return set()


def actor_rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def new_queue(max_concurrency: int):
    queue = (ray.remote(Admission).options(max_concurrency=max_concurrency, num_cpus=0)
             .remote(capacity=one_cpu, dead_jobs=no_dead_jobs, gather_s=0.0, max_waiting=max_concurrency))
    ray.get(queue.ping.remote())
    from ray.util.state import list_actors

    actor_id = queue._actor_id.hex()
    (actor,) = [a for a in list_actors(filters=[("actor_id", "=", actor_id)])]
    return queue, actor["pid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", default="20000,60000", help="counts of waiting calls, comma-separated")
    parser.add_argument("--slots", type=int, default=4, help="max_concurrency for the slot check")
    parser.add_argument("--json")
    args = parser.parse_args()
    counts = [int(c) for c in args.waiting.split(",")]

    ray.init(num_cpus=1, include_dashboard=True, log_to_driver=False)
    driver = psutil.Process()
    queue, actor_pid = new_queue(ADMISSION_MAX_WAITING)
    readings = [{"waiting": 0, "actor_rss_mib": actor_rss_mib(actor_pid),
                 "driver_rss_mib": driver.memory_info().rss / 2**20, "seconds": 0.0}]
    print(f"idle: actor {readings[0]['actor_rss_mib']:.0f} MiB, driver {readings[0]['driver_rss_mib']:.0f} MiB")
    refs, sent = [], 0
    for count in counts:
        started = time.monotonic()
        refs += [queue.admit.remote(f"c{sent + i}", 0, 1.0, 1e6, float(sent + i)) for i in range(count)]
        sent += count
        while True:
            status = ray.get(queue.status.remote())
            if status["waiting"] + status["admitted"] >= sent or time.monotonic() - started > 600:
                break
            time.sleep(1.0)
        reading = {"waiting": status["waiting"], "actor_rss_mib": actor_rss_mib(actor_pid),
                   "driver_rss_mib": driver.memory_info().rss / 2**20, "seconds": time.monotonic() - started}
        readings.append(reading)
        print(f"{reading['waiting']:,} waiting: actor {reading['actor_rss_mib']:.0f} MiB, driver "
              f"{reading['driver_rss_mib']:.0f} MiB ({reading['seconds']:.0f} s to send and queue)")
    first, last = readings[0], readings[-1]
    per_call = (last["actor_rss_mib"] - first["actor_rss_mib"]) * 2**20 / max(1, last["waiting"] - first["waiting"])
    print(f"the actor's memory per waiting call: {per_call / 1000:.0f} KB")
    ray.kill(queue)
    del refs

    small, _ = new_queue(args.slots)
    calls = [small.admit.remote(f"s{i}", 0, 1.0, 1e6, float(i)) for i in range(args.slots + 2)]
    ray.wait(calls, num_returns=1, timeout=30)
    try:
        ray.get(small.ended.remote(["s0"]), timeout=10)
        ended_got_through = True
    except ray.exceptions.GetTimeoutError:
        ended_got_through = False
    print(f"{args.slots} slots, {args.slots + 2} calls sent (1 admitted): an end got through: {ended_got_through}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "readings": readings,
                       "actor_bytes_per_waiting_call": per_call, "slots": args.slots,
                       "ended_got_through_at_slots_plus_two": ended_got_through, "ray": ray.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
