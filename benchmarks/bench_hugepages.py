"""Why a batch's first big allocations are slow here: numpy's huge pages on a VM that hands freed memory back.

numpy asks the kernel for transparent huge pages for big arrays (``madvise``).  This
machine is a Firecracker VM whose kernel reports free blocks of huge-page size to the
host (``page_reporting``, a balloon's free page reporting): the host takes them back,
and a guest that touches them again waits for the host to supply them anew.  So a big
numpy allocation is fast on memory freed a moment ago and many times slower on memory
that has been free for a few seconds; with 4 KiB pages (``NUMPY_MADVISE_HUGEPAGE=0``)
freed memory is seldom a whole reported block, and the penalty is gone.

Two measurements, each with numpy's default and with ``NUMPY_MADVISE_HUGEPAGE=0``:

- *pairs*: two processes at once each grow ``--mib`` in 50 MiB blocks with a 50 ms
  sleep after each (as bench_monitor.py's tasks do), three times in a row; prints each
  process's seconds (the sleeps alone are 1.4 s for 1,400 MiB);
- *idle gaps*: one process allocates ``--mib`` at once, frees it, sleeps a gap and
  allocates again, for each gap of ``--gaps``; prints the seconds of each allocation.

    python benchmarks/bench_hugepages.py [--mib 1400] [--gaps 0.1,3,0.1,10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

GROW = """
import time, numpy as np
t = time.perf_counter(); blocks = []
for _ in range({steps}):
    blocks.append(np.ones(50 * 2**20 // 8)); time.sleep(0.05)
print(round(time.perf_counter() - t, 2))
"""

GAPS = """
import time, numpy as np
def allocate():
    t = time.perf_counter(); a = np.ones({mib} * 2**20 // 8); s = time.perf_counter() - t; del a; return round(s, 2)
first = allocate(); after = []
for gap in {gaps!r}:
    time.sleep(gap); after.append(allocate())
print(first, after)
"""

#: The kernel's settings that decide it, printed when this machine has them.
SETTINGS = ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
            "/sys/module/page_reporting/parameters/page_reporting_order",
            "/sys/module/page_reporting/parameters/min_free_ms")


def pair(env: dict[str, str], steps: int) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", GROW.format(steps=steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    return [float(p.communicate()[0]) for p in procs]


def gaps(env: dict[str, str], mib: int, idle: list[float]) -> str:
    return subprocess.run([sys.executable, "-c", GAPS.format(mib=mib, gaps=idle)], env=env, stdout=subprocess.PIPE,
                          text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1400, help="what each process grows to, MiB (default 1400)")
    parser.add_argument("--gaps", default="0.1,3,0.1,10",
                        help="idle seconds before each allocation after the first (default 0.1,3,0.1,10)")
    args = parser.parse_args()
    steps = max(1, args.mib // 50)  # blocks of 50 MiB
    idle = [float(g) for g in args.gaps.split(",") if g.strip()]
    for path in SETTINGS:
        try:
            print(f"{path}: {Path(path).read_text().strip()}")
        except OSError:
            print(f"{path}: not on this machine")
    for label, extra in (("numpy's default (huge pages asked for)", {}),
                         ("NUMPY_MADVISE_HUGEPAGE=0", {"NUMPY_MADVISE_HUGEPAGE": "0"})):
        env = {**os.environ, **extra}
        print(f"{label}: seconds per pair, three pairs in a row:", [pair(env, steps) for _ in range(3)], flush=True)
        print(f"{label}: {args.mib} MiB at once, first then after idle gaps of {idle} s:", gaps(env, args.mib, idle),
              flush=True)


if __name__ == "__main__":
    main()
