"""A function whose use shifts without a code change: how fast does raysched follow?

Replays the runtime's pure policy online (``raysched.policy``: the predictor, the
sizer, the ladder and the OOM bump; models trained by the profiler's rules: after
``max(retrain_after_new_rows, 10%)`` new rows, served only when no worse on the
holdout), with ``shift_detection`` on and off, side by side:

* ``pre`` calls of a function whose memory is ``300 MiB + 2 x input`` (input 10 MiB -
  1 GiB, log-uniform), 2 cores and 10 s (10% noise on each), then ``post`` calls with
  all three multiplied by ``factor``;
* a call whose use is above its allocation is killed (its use at the kill is the
  allocation) and climbs the ladder; its killed attempt is a censored, bumped row.

Per scenario and setting: calls after the shift that lost an attempt to the memory
killer, and medians of memory allocation / use, CPU allocation / use and the share of
calls whose wall time is under the prediction's upper bound, over windows of calls
after the shift.

Run:  python benchmarks/sim_drift.py [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from raysched.config import RayschedConfig
from raysched.policy.ladder import LadderState
from raysched.policy.models import evaluate, holdout
from raysched.policy.recipe import TrainedModels, build_ladder, build_predictor
from raysched.policy.samples import oom_bump
from raysched.policy.sizing import size
from raysched.types import AttemptRecord, Features, History, MiB, Outcome, Usage

SCENARIOS = ((300, 2.0, 400), (2000, 2.0, 400), (300, 0.5, 400), (2000, 0.5, 400))
WINDOWS = ((0, 10), (10, 50), (50, 100), (100, 200), (200, 400))


class Online:
    """The history and served models one function would have under the profiler."""

    def __init__(self, config: RayschedConfig):
        self.config = config
        self.columns: dict[str, list] = {k: [] for k in ("input_size", "memory", "cpu", "wall", "censored")}
        self.served: dict = {}
        self.new_rows = 0
        self.trainings = 0

    def add(self, size_: float, memory: float, cpu: float, wall: float, censored: bool = False) -> None:
        for key, value in zip(self.columns, (size_, memory, cpu, wall, censored)):
            self.columns[key].append(value)
        self.new_rows += 1

    def history(self) -> History:
        n = len(self.columns["memory"])
        return History(input_size=np.array(self.columns["input_size"], float),
                       memory=np.array(self.columns["memory"], float), cpu=np.array(self.columns["cpu"], float),
                       wall=np.array(self.columns["wall"], float), disk=np.full(n, np.nan), version=n,
                       censored=np.array(self.columns["censored"], bool)).tail(self.config.history_window)

    def maybe_train(self) -> None:
        cfg = self.config
        held = min(len(self.columns["memory"]), cfg.history_window)
        first = not self.served and self.trainings == 0
        if held < cfg.min_history_for_model or not (first or self.new_rows >= max(cfg.retrain_after_new_rows, 0.1 * held)):
            return
        self.new_rows = 0
        history = self.history()
        self.trainings += 1
        for resource, model in build_predictor(cfg).train(history).by_resource.items():
            served = self.served.get(resource)
            runs, true = holdout(history, resource, cfg)
            served_loss = evaluate(served, runs, true)["pinball_loss"] if served is not None else math.inf
            if model.metrics["pinball_loss"] <= served_loss + 1e-12:
                self.served[resource] = model.with_version(self.trainings)


def run(pre: int, factor: float, post: int, config: RayschedConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    predictor, ladder = build_predictor(config), build_ladder(config)
    online = Online(config)
    largest_peak = 0.0
    after: list[dict] = []
    for t in range(pre + post):
        k = factor if t >= pre else 1.0
        s = float(np.exp(rng.uniform(np.log(10 * MiB), np.log(1000 * MiB))))
        noise = np.exp(rng.normal(0, 0.1, 3))
        memory, cpu, wall = (300 * MiB + 2 * s) * k * noise[0], 2.0 * k * noise[1], 10.0 * k * noise[2]
        prediction = predictor.predict(Features(input_size=int(s)), online.history(), TrainedModels(dict(online.served)))
        first = allocation = size(prediction, config)
        attempts: list[AttemptRecord] = []
        while memory > allocation.memory_bytes and len(attempts) < 8:
            killed_at = float(allocation.memory_bytes)
            attempts.append(AttemptRecord(attempt=len(attempts) + 1, allocation=allocation,
                                          outcome=Outcome.OOM_KILLED, usage=Usage(peak_rss_bytes=int(killed_at))))
            online.add(s, oom_bump(killed_at, config), math.nan, math.nan, censored=True)
            largest_peak = max(largest_peak, killed_at)
            allocation = ladder.next_allocation(LadderState(prediction, tuple(attempts), largest_peak, None)) or \
                allocation.__class__(num_cpus=allocation.num_cpus, memory_bytes=int(2 * memory), rung=9, reason="x")
        online.add(s, memory, cpu, wall)
        largest_peak = max(largest_peak, memory)
        online.maybe_train()
        if t >= pre:
            after.append({"killed": bool(attempts), "memory": first.memory_bytes / memory,
                          "cpu": first.num_cpus / cpu, "wall_covered": wall <= prediction.wall.upper})
    out = {"calls_with_a_killed_attempt": int(sum(a["killed"] for a in after))}
    for lo, hi in WINDOWS:
        window = after[lo:hi]
        out[f"{lo}-{hi}"] = {"memory_alloc_per_use": round(float(np.median([a["memory"] for a in window])), 2),
                             "cpu_alloc_per_use": round(float(np.median([a["cpu"] for a in window])), 2),
                             "wall_upper_coverage": round(float(np.mean([a["wall_covered"] for a in window])), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = []
    started = time.perf_counter()
    for pre, factor, post in SCENARIOS:
        for detection in (False, True):
            r = run(pre, factor, post, RayschedConfig(shift_detection=detection), args.seed)
            results.append({"pre": pre, "factor": factor, "post": post, "shift_detection": detection, **r})
            print(f"{pre:5d} runs, then x{factor}: shift_detection={detection!s:5}: "
                  f"{r['calls_with_a_killed_attempt']:3d} of {post} calls lost an attempt; "
                  + "; ".join(f"calls {w}: mem {r[w]['memory_alloc_per_use']:.2f}, cpu {r[w]['cpu_alloc_per_use']:.2f}, "
                              f"wall cov {r[w]['wall_upper_coverage']:.2f}" for w in ("0-10", "10-50", "100-200")),
                  flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
