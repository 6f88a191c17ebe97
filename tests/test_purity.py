"""The policy core imports neither ray, mlflow nor pyarrow, so trace replay runs the same code."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import raysched

PURE = ["raysched/types.py", "raysched/config.py", "raysched/errors.py", "raysched/policy"]
FORBIDDEN = {"ray", "mlflow", "pyarrow"}
ROOT = pathlib.Path(raysched.__file__).resolve().parent.parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pure_modules_import_no_runtime_stack_statically():
    files = []
    for entry in PURE:
        p = ROOT / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert len(files) >= 8
    for f in files:
        bad = imported_modules(f) & FORBIDDEN
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def loaded_in_a_fresh_python(modules: list[str], packages: set[str]) -> list[str]:
    """Which of ``packages`` a fresh interpreter has loaded after importing ``modules``."""
    code = (
        "import sys\n"
        f"import {', '.join(modules)}\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(packages)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return [m for m in out.stdout.strip().split(",") if m]


def test_pure_modules_import_no_runtime_stack_at_run_time():
    pure = ["raysched.policy.recipe", "raysched.policy.features", "raysched.policy.calibrate",
            "raysched.policy.sizing", "raysched.policy.ladder", "raysched.policy.samples"]
    assert loaded_in_a_fresh_python(pure, FORBIDDEN) == []


def test_the_worker_side_stays_light():
    """What a Ray worker imports to measure and report a task loads no pandas, pyarrow, MLflow or XGBoost.

    Importing pandas took 0.5 s in the sampler thread of a fresh worker, so the
    first task of every worker published its live use a second late.
    """
    worker_side = ["raysched.runtime.worker", "raysched.runtime.spec", "raysched.runtime.rows",
                   "raysched.runtime.options", "raysched.runtime.monitor", "raysched.runtime.measure",
                   "raysched.runtime.actor_worker"]
    assert loaded_in_a_fresh_python(worker_side, {"pandas", "pyarrow", "mlflow", "xgboost"}) == []
