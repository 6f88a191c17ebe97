"""Why a batch's first big allocations are slow here: numpy's transparent huge pages.

Two processes at once each grow 1.4 GB in 50 MiB numpy blocks with a 50 ms sleep after
each (as bench_monitor.py's tasks do), three times in a row, with numpy's default (it
asks the kernel for huge pages for big arrays: ``madvise``) and with
``NUMPY_MADVISE_HUGEPAGE=0``.  Prints each process's seconds; the sleeps alone are 1.4 s.

    python benchmarks/bench_hugepages.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

GROW = """
import time, numpy as np
t = time.perf_counter(); blocks = []
for _ in range({steps}):
    blocks.append(np.ones(50 * 2**20 // 8)); time.sleep(0.05)
print(round(time.perf_counter() - t, 2))
"""


def pair(env: dict[str, str], steps: int) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", GROW.format(steps=steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1400, help="what each process grows to, MiB (default 1400)")
    steps = max(1, parser.parse_args().mib // 50)  # blocks of 50 MiB
    for path in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag"):
        try:
            with open(path) as f:
                print(f"{path}: {f.read().strip()}")
        except OSError:
            print(f"{path}: not readable")
    for label, extra in (("numpy's default (huge pages asked for)", {}),
                         ("NUMPY_MADVISE_HUGEPAGE=0", {"NUMPY_MADVISE_HUGEPAGE": "0"})):
        env = {**os.environ, **extra}
        print(f"{label}: seconds per pair, three pairs in a row:", [pair(env, steps) for _ in range(3)], flush=True)


if __name__ == "__main__":
    main()
