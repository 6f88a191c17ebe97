"""`raysched demo`, the main job, run end to end as a user runs it: a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_the_demo_starts_its_own_cluster_whatever_ray_address_names(tmp_path):
    """The README says the demo starts a local Ray cluster. With Ray's own default it joined
    the cluster of ``RAY_ADDRESS`` (or the last ``ray start``), and on one that had died it
    waited minutes for its GCS (a helper's audit: over 8 minutes, then killed)."""
    env = dict(os.environ, RAYSCHED_HOME=str(tmp_path / "home"), RAY_ADDRESS="127.0.0.1:9",  # nothing listens
               RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "raysched.cli", "demo", "--tasks", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Starting a local Ray cluster" in done.stdout
    assert "Round cold" in done.stdout and "Round warm" in done.stdout
    assert (tmp_path / "home" / "profiles").is_dir()
    # The commands it prints to read what it recorded work as printed.
    home = tmp_path / "home"
    assert f"raysched profiles --home {home}" in done.stdout and f"raysched events --home {home}" in done.stdout
    for command, expected in (("profiles", "ok"), ("events", "")):
        shown = subprocess.run([sys.executable, "-m", "raysched.cli", command, "--home", str(home)], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and expected in shown.stdout, shown.stdout + shown.stderr
