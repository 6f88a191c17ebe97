"""Ray's own cost of the shape raysched gives a task: plain ``@ray.remote`` tasks, each variant
with one of the options raysched sets per call, side by side in one Ray session.

raysched submits ``entry(spec_bytes, *args)`` with ``memory=``, ``name=`` and ``max_retries=``
(``runtime.options.remote_options``). This measures what those cost Ray itself, apart from
raysched's own work (planning, measuring, storing), on ``return x + 1``: 2,000 tasks all at
once, the variants interleaved and their order rotated each repetition.

    python benchmarks/bench_task_shape.py --tasks 2000 --repeats 7

Not part of the test suite: figures go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

MiB = 2**20
#: About the size of raysched's first argument (a pickled attempt template and a call id).
SPEC = os.urandom(400)


@ray.remote
def inc(x):
    return x + 1


@ray.remote
def inc_with_spec(spec, x):
    return x + 1


#: name -> how call i is submitted. Every variant but "plain" goes through ``.options()``
#: per call, as raysched's submissions do.
VARIANTS = {
    "plain": lambda i: inc.remote(i),
    "plain, again": lambda i: inc.remote(i),
    "memory=64 MiB": lambda i: inc.options(memory=64 * MiB).remote(i),
    "400-byte first argument": lambda i: inc_with_spec.remote(SPEC, i),
    "name=": lambda i: inc.options(name="inc").remote(i),
    "max_retries=4": lambda i: inc.options(max_retries=4).remote(i),
    "all of them": lambda i: inc_with_spec.options(memory=64 * MiB, name="inc", max_retries=4).remote(SPEC, i),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for submit in VARIANTS.values():  # workers started, functions exported
            ray.get([submit(i) for i in range(300)])
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                ray.get([VARIANTS[name](i) for i in range(args.tasks)])
                rates[name].append(args.tasks / (time.perf_counter() - t0))
    finally:
        ray.shutdown()
    plain = statistics.median(rates["plain"])
    print(f"{args.tasks} tasks all at once, medians of {args.repeats} interleaved repetitions; "
          f"ratio = variant / plain of the medians; paired = median of the ratios within a repetition")
    print(f"{'variant':26s} {'tasks/s':>9s} {'ratio':>6s} {'paired':>7s}")
    for name in names:
        paired = statistics.median(a / b for a, b in zip(rates[name], rates["plain"]))
        print(f"{name:26s} {statistics.median(rates[name]):9.1f} {statistics.median(rates[name]) / plain:6.2f} {paired:7.2f}")


if __name__ == "__main__":
    main()
