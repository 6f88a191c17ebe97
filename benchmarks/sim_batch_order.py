"""How close can any dispatch order get to perfect packing on the monitor benchmark's batch?

A simulation on raysched's own admission queue (``raysched.policy.admission``, pure), on a
simulated clock: the batch of ``bench_monitor.py`` (20 tasks of 200..1,400 MiB, each
holding its size + 0.17 GiB of worker for 1.1 s + 1.4 s per GiB; a node of 3.25 GiB and
8 slots of 0.25 CPU) and seven more batches drawn from the same distribution.  For each
it prints the makespan as a share of the worst case's (every task asking 1,600 MiB: two
at a time) for

- ``perfect``: the memory-seconds spread evenly over the node (a lower bound no real
  order reaches: tasks are indivisible);
- ``strict``: the queue without backfill, first submitted first (what Ray's own dispatch
  measured like, see benchmarks/README.md);
- ``easy``: EASY backfill, first submitted first;
- ``largest``: EASY backfill, largest memory x wall first (``bench_monitor.py
  --raysched-order largest_first``);
- ``searched``: the best of ``--search`` random pairwise swaps of the largest-first
  order, evaluated on the exact durations (an offline optimum the online queue does not
  have);
- ``searched_noisy`` / ``largest_noisy``: those two orders when each task's real
  duration is its predicted one x U(1 - noise, 1 + noise) (median over 31 draws):
  whether an order tuned to the predictions keeps its gain when they are off.

    python benchmarks/sim_batch_order.py --search 1000 --noise 0.15

Pure Python: no Ray, a few seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

from raysched.policy.admission import FIRST_SUBMITTED, LARGEST_FIRST, AdmissionQueue, Request, order_key

GiB = 2**30
BENCH_SIZES_GIB = [0.8, 1.4, 0.8, 0.2, 0.6, 1.0, 0.9, 0.8, 1.4, 0.6, 0.9, 0.7, 1.1, 0.5, 1.0, 0.4, 0.6, 0.4, 1.4, 0.3]
WORKER_GIB = 0.17
NODE = Request(2.0, 3.25 * GiB)
WORST_REQUEST_GIB = 1600 / 1024


def duration(size_gib: float) -> float:
    return 1.1 + 1.4 * size_gib


def makespan(mem_gib: list[float], walls: list[float], order: list[int], backfill: bool = True,
             real_walls: list[float] | None = None) -> float:
    """Run the batch through the admission queue in ``order``; when the last call ends.

    The queue plans with ``walls`` (the predictions); tasks run for ``real_walls``."""
    real = real_walls or walls
    q = AdmissionQueue(NODE, backfill=backfill)
    for rank, i in enumerate(order):
        q.add(str(i), 0, Request(0.25, mem_gib[i] * GiB, walls[i]), float(rank))
    now, ends = 0.0, {}
    for token in q.admit(now):
        ends[token] = now + real[int(token)]
    while q.waiting() or q.admitted():
        token = min((t for t in ends if q.is_admitted(t)), key=ends.get)
        now = ends[token]
        for admitted in q.finish(token, now=now):
            ends[admitted] = now + real[int(admitted)]
    return max(ends.values())


def worst_case(walls: list[float]) -> float:
    """Every task asks the worst-case memory: as many at once as fit (two here), in order."""
    per_node = max(1, int(NODE.memory_bytes // (WORST_REQUEST_GIB * GiB)))
    slots = [0.0] * per_node
    for wall in walls:
        k = min(range(per_node), key=slots.__getitem__)
        slots[k] += wall
    return max(slots)


def search(mem: list[float], walls: list[float], start: list[int], tries: int, rnd: random.Random) -> list[int]:
    best, best_value = list(start), makespan(mem, walls, start)
    for _ in range(tries):
        candidate = list(best)
        a, b = rnd.sample(range(len(candidate)), 2)
        candidate[a], candidate[b] = candidate[b], candidate[a]
        value = makespan(mem, walls, candidate)
        if value <= best_value:
            best, best_value = candidate, value
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="the benchmark's batch, then N-1 drawn ones")
    parser.add_argument("--search", type=int, default=1000, help="random swaps tried for 'searched'")
    parser.add_argument("--noise", type=float, default=0.15, help="relative error of the wall-time predictions")
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args(argv)

    rows = []
    for batch in range(args.batches):
        rnd = random.Random(batch)
        sizes = BENCH_SIZES_GIB if batch == 0 else [rnd.choice([x / 10 for x in range(2, 15)]) for _ in BENCH_SIZES_GIB]
        mem = [s + WORKER_GIB for s in sizes]
        walls = [duration(s) for s in sizes]
        worst = worst_case(walls)
        n = len(sizes)
        submitted = list(range(n))
        largest = sorted(submitted, key=lambda i: order_key(LARGEST_FIRST, i, mem[i], walls[i]))
        assert sorted(submitted, key=lambda i: order_key(FIRST_SUBMITTED, i, mem[i], walls[i])) == submitted
        searched = search(mem, walls, largest, args.search, random.Random(1))

        def noisy(order: list[int]) -> float:
            shares = []
            for draw in range(31):
                r = random.Random(1000 + draw)
                real = [w * r.uniform(1 - args.noise, 1 + args.noise) for w in walls]
                shares.append(makespan(mem, walls, order, real_walls=real) / worst_case(real))
            return statistics.median(shares)

        row = {
            "batch": "bench" if batch == 0 else f"drawn-{batch}",
            "perfect": sum(m * w for m, w in zip(mem, walls)) / (NODE.memory_bytes / GiB) / worst,
            "strict": makespan(mem, walls, submitted, backfill=False) / worst,
            "easy": makespan(mem, walls, submitted) / worst,
            "largest": makespan(mem, walls, largest) / worst,
            "searched": makespan(mem, walls, searched) / worst,
            "largest_noisy": noisy(largest),
            "searched_noisy": noisy(searched),
        }
        rows.append(row)

    columns = ["perfect", "strict", "easy", "largest", "searched", "largest_noisy", "searched_noisy"]
    print("| batch | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row in rows:
        print(f"| {row['batch']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("| median | " + " | ".join(f"{statistics.median(r[c] for r in rows):.3f}" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
