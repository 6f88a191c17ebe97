"""The notebooks run: their code cells, in order, in a fresh Python, from the notebooks folder.

No Jupyter needed: a notebook's code cells are joined and run as one script, so a
notebook that no longer works with the package fails the suite.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def code_of(name: str) -> str:
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def run_notebook(name: str, tmp_path: pathlib.Path, timeout: float) -> str:
    env = dict(os.environ, RAYSCHED_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled",
               RAY_ADDRESS="local", MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-c", code_of(name)], cwd=NOTEBOOKS, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_every_notebook_is_valid_and_has_no_stored_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_trace_replay.ipynb"]
    for name in names:
        nb = json.loads((NOTEBOOKS / name).read_text())
        assert nb["nbformat"] == 4
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
        # nbformat 4.5 cells carry ids (Jupyter warns without them, and will refuse), unique
        ids = [c.get("id") for c in nb["cells"]]
        assert nb["nbformat_minor"] >= 5 and all(ids) and len(set(ids)) == len(ids), (name, ids)


def test_trace_replay_notebook_runs(tmp_path):
    out = run_notebook("02_trace_replay.ipynb", tmp_path, timeout=600)
    assert "replaying" in out and "raysched" in out and "oracle" in out


@pytest.mark.ray
def test_quickstart_notebook_runs_on_a_local_ray(tmp_path):
    out = run_notebook("01_quickstart.ipynb", tmp_path, timeout=600)
    assert "cold prediction: fallback" in out
    assert "history" in out or "model" in out  # the warm predictions come from the first round
    assert "monitor events" in out
