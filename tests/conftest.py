"""Shared fixtures: one Ray session per test module, each with its own raysched home."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import time

import pytest

# Ray >= 2.60 turns on token authentication for a new local cluster; tests start
# their own clusters and say so explicitly.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Workers import test modules (functions and exception classes defined in them) by name.
_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

# The suite runs on two pytest-xdist workers (pyproject's addopts), each test module on one
# (``--dist loadfile``: one Ray session per module, as before). Each worker gets its own Ray
# temp directory, so that a ``ray.init()`` (raysched's own, in a driver that did not call it)
# never finds, through ray_current_cluster, a cluster the other worker started.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER:
    os.environ["RAY_TMPDIR"] = f"/tmp/raysched-tests-{_XDIST_WORKER}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

SHARED_TRACES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def ray_takes_task_option(name: str) -> bool:
    """Whether the installed Ray knows this task option (``label_selector`` and
    ``fallback_strategy`` are newer than Ray 2.40, which pyproject still allows)."""
    import importlib

    for module in ("ray._common.ray_option_utils", "ray._private.ray_option_utils"):
        try:
            return name in importlib.import_module(module).task_options
        except (ImportError, AttributeError):
            continue
    return False


def wait_for(predicate, timeout=30.0, step=0.1):
    """Poll ``predicate`` until it is true or ``timeout`` passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def free_port() -> int:
    """A TCP port nothing listens on now (for a second dashboard in one test session)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _process_config_restored(request):
    """Every test leaves raysched's process config as it found it: a test that called
    ``raysched.configure`` made the process "configured here" with the home of that moment,
    and a later test's RAYSCHED_HOME was ignored (the demo ran in the checkout's ./.raysched).

    A test without Ray starts from none at all: its config is its environment's. One cached
    after a Ray module's end (by a thread of its session, say) was taken for it (the demo ran
    in the checkout's ./.raysched again, where the two workers put the pure tests after the Ray ones)."""
    from raysched.runtime import client, session

    saved = (session._config, session._configured_here)
    if request.node.get_closest_marker("ray") is None and saved != (None, False):
        session._config, session._configured_here = None, False
        client.reset_client()
    yield
    if (session._config, session._configured_here) != saved:
        from raysched.runtime import client

        session._config, session._configured_here = saved
        client.reset_client()


@contextlib.contextmanager
def a_child_holding(mib: int):
    """A child process of this one holding ``mib`` MiB resident until the block ends (a pool
    or a forkserver an earlier task left running in a worker)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", f"import time; x = b'\\x01' * ({mib} * 2**20); "
                              "print(1, flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"  # its pages are resident
        yield child
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def environment(**values: str):
    """Set environment variables (and raysched's process config from them), then restore both."""
    from raysched.runtime import client, session

    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    session._config = None  # re-read RAYSCHED_HOME
    client.reset_client()
    try:
        yield
    finally:
        client.reset_client()
        session._config = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray with 2 CPUs and a fresh RAYSCHED_HOME, shared by one test module."""
    import ray

    home = tmp_path_factory.mktemp("raysched_home")
    with environment(RAYSCHED_HOME=str(home)):
        # address="local": always a new cluster, never one another process left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="raysched", log_to_driver=False)
        try:
            yield home
        finally:
            ray.shutdown()


# --- two workers, one machine --------------------------------------------------------------------
#
# A few tests read the whole machine's memory (Ray's memory monitor kills by it; their thresholds
# are set from what the machine uses when they start): the other worker starting, stopping or
# filling a Ray session meanwhile would move their ground. They are marked ``alone``. Every test
# holds a lock on the machine from its set-up to its tear-down (which start and stop its module's
# Ray): shared, or exclusive for an ``alone`` test, kept from one test of an ``alone`` module to the
# next. A turnstile keeps the other worker's next shared hold behind a waiting exclusive one.


class MachineLock:
    """Shared or exclusive hold of the machine among one test run's xdist workers (flock)."""

    def __init__(self, path: str):
        self._main = open(path, "a+")  # noqa: SIM115 - held for the worker's life
        self._turnstile = open(path + ".turnstile", "a+")  # noqa: SIM115
        self.exclusive: bool | None = None  # None: not held

    def hold(self, exclusive: bool) -> None:
        if self.exclusive is exclusive:
            return
        self.release()
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        self.exclusive = exclusive

    def release(self) -> None:
        if self.exclusive is not None:
            fcntl.flock(self._main, fcntl.LOCK_UN)
            self.exclusive = None

    def close(self) -> None:
        self.release()
        self._main.close()
        self._turnstile.close()


_MACHINE = (MachineLock(f"/tmp/raysched-tests-{os.environ['PYTEST_XDIST_TESTRUNUID']}.lock")
            if _XDIST_WORKER and os.environ.get("PYTEST_XDIST_TESTRUNUID") else None)


def _alone(item) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _MACHINE is None:
        yield
        return
    _MACHINE.hold(exclusive=_alone(item))
    try:
        yield
    finally:
        if not (_alone(item) and _alone(nextitem) and getattr(nextitem, "module", None) is item.module):
            _MACHINE.release()


def pytest_unconfigure(config):
    if _MACHINE is not None:
        _MACHINE.close()


def pytest_collection_modifyitems(config, items):
    """Ray modules first (a few of their tests take 20-40 s each), then the quick pure ones, so
    that two workers finish together; within a module the written order is kept."""
    first_of_module: dict[str, int] = {}
    for index, item in enumerate(items):
        first_of_module.setdefault(item.nodeid.split("::")[0], index)

    def rank(item):
        module = item.nodeid.split("::")[0]
        return (item.get_closest_marker("ray") is None, first_of_module[module])

    items.sort(key=rank)
