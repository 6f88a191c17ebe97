"""raysched connects to Ray itself when the user has not called ``ray.init()``: its own process,
since an initialised Ray cannot be undone for one test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import environment

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent("""
    import threading
    import ray
    from raysched import adaptive_remote

    @adaptive_remote
    def square(x):
        return x * x

    errors, results = [], []
    barrier = threading.Barrier(8)

    def first_call(i):
        barrier.wait()
        try:
            results.append(ray.get(square.remote(i), timeout=120))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(sorted(results), errors)
    ray.shutdown()

    # Ray started again from a thread, and shut down again: the thread that keeps each
    # session's processes alive ends with its session.
    runner = threading.Thread(target=first_call, args=(9,))
    barrier = threading.Barrier(1)
    runner.start(); runner.join()
    keepers = lambda: [t for t in threading.enumerate() if t.name == "raysched-ray-init"]
    alive_during = len(keepers())
    ray.shutdown()
    import time
    deadline = time.monotonic() + 10
    while keepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    print("keepers", alive_during, len(keepers()), results[-1], errors)
""")


def test_threads_making_their_first_calls_together_start_ray_once(tmp_path):
    # Each thread's first call found Ray not initialised and called ray.init(): all but one
    # failed with "Perhaps you called ray.init twice by accident?". Plain Ray serialises it.
    # And the cluster, started by one of the threads, died when that thread ended (Ray's
    # processes share the fate of the thread that starts them), under the others' calls.
    with environment(RAYSCHED_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_ADDRESS="local",
                     RAYSCHED_LOG_TO_DRIVER="0",
                     PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                               os.environ.get("PYTHONPATH")]))):
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                              cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "[0, 1, 4, 9, 16, 25, 36, 49] []", done.stdout[-2000:]
    # While Ray ran from a thread's first call, one keeper; after ray.shutdown(), none
    # (one was kept for the life of the process per start: they piled up).
    assert lines[-1] == "keepers 1 0 81 []", done.stdout[-2000:]
