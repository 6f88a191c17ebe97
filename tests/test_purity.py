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


def test_pure_modules_import_no_runtime_stack_at_run_time():
    code = (
        "import sys\n"
        "import raysched.policy.recipe, raysched.policy.features, raysched.policy.calibrate\n"
        "import raysched.policy.sizing, raysched.policy.ladder, raysched.policy.samples\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'pyarrow'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_the_worker_side_stays_light():
    """What a Ray worker imports to measure and report a task loads no pandas, pyarrow, MLflow or XGBoost.

    Importing pandas took 0.5 s in the sampler thread of a fresh worker, so the
    first task of every worker published its live use a second late.
    """
    code = (
        "import sys\n"
        "import raysched.runtime.worker, raysched.runtime.monitor, raysched.runtime.measure\n"
        "heavy = {'pandas', 'pyarrow', 'mlflow', 'xgboost'}\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
