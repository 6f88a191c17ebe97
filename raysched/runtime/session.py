"""Process-wide runtime state: the config (built once), Ray start-up, the cluster's shape."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
import warnings
from typing import Any, Mapping

import ray

from ..config import HOME_ENV, RayschedConfig
from ..errors import InvalidInput
from ..types import ClusterShape, NodeShape

NAMESPACE = "raysched"
#: The home a RayschedConfig built without one names (configure warns when the environment names another).
_DEFAULT_HOME = RayschedConfig.home

#: The version of the service actors' methods, in their names: a driver of a newer raysched on
#: a cluster that outlived an upgrade found the older version's detached admission actor by its
#: name and called it with arguments it did not take ("TypeError: too many positional
#: arguments" at every call with a priority; an audit). Raise it whenever a method a driver or a
#: worker calls on the profiler, the monitor or the admission queue changes; each version then
#: starts its own actors (README, "Upgrading").
SERVICE_PROTOCOL = "v2"
#: Base names of the service actors that belong to one raysched home (see ``service_name``).
PROFILER_BASE = "raysched_profiler"
MONITOR_BASE = "raysched_monitor"
#: The profiler's concurrency group that workers send their rows to (``Profiler.record``).
RECORD_GROUP = "record"


def service_name(base: str, config: RayschedConfig) -> str:
    """The Ray name of a service actor of the config's home.

    Each home (``RAYSCHED_HOME``) has its own profiler and monitor, found by a name
    derived from the home's absolute path: drivers (or Ray Jobs) that share a home
    share what was learnt, and a driver with another home never writes into, or
    predicts from, a store it did not name.  The admission queue counts the
    cluster's resources and stays one per cluster.
    """
    return f"{base}-{SERVICE_PROTOCOL}-{_home_key(str(config.home_path))}"


@functools.lru_cache(maxsize=64)
def _home_key(home: str) -> str:
    return hashlib.sha1(home.encode()).hexdigest()[:12]


def profiler_name(config: RayschedConfig) -> str:
    return service_name(PROFILER_BASE, config)


def monitor_name(config: RayschedConfig) -> str:
    return service_name(MONITOR_BASE, config)


# --- which folder is the home: a node sees the profiler's, or only one of the same name ------------

#: A file in a home that names that folder.  Its profiler publishes the name in Ray's KV, so
#: that a worker on another node can tell the profiler's own folder (shared storage) from a
#: folder of the same path on its own disk, which nobody else reads.
HOME_ID_FILE = ".raysched-home-id"
_HOME_ID_KV_NAMESPACE = "raysched_home"


def _home_id_key(config: RayschedConfig) -> str:
    return f"home-id:{_home_key(str(config.home_path))}"


def read_home_id(config: RayschedConfig) -> str | None:
    """The id in this node's view of ``config``'s home; None if it has none (or cannot be read)."""
    try:
        return (config.home_path / HOME_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def ensure_home_id(config: RayschedConfig) -> str:
    """The home's id, created (once, whichever process gets there first) if it has none."""
    found = read_home_id(config)
    if found is not None:
        return found
    home = config.home_path
    home.mkdir(parents=True, exist_ok=True)
    new = os.urandom(16).hex()
    tmp = home / f".{HOME_ID_FILE}.{new}"
    tmp.write_text(new)
    try:
        os.link(tmp, home / HOME_ID_FILE)  # never replaces an id another process wrote first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_home_id(config) or new


def publish_home_id(config: RayschedConfig) -> str | None:
    """Called where the home's profiler runs: put the home's id in Ray's KV; None if it could not."""
    from ray.experimental import internal_kv

    try:
        home_id = ensure_home_id(config)
        internal_kv._internal_kv_put(_home_id_key(config), home_id.encode(), overwrite=True,
                                     namespace=_HOME_ID_KV_NAMESPACE)
        return home_id
    except Exception:  # noqa: BLE001 - workers then take their home for the profiler's, as before
        return None


def published_home_id(config: RayschedConfig) -> str | None:
    """The id the home's profiler published; None if none did (or Ray's KV cannot be read)."""
    from ray.experimental import internal_kv

    try:
        value = internal_kv._internal_kv_get(_home_id_key(config), namespace=_HOME_ID_KV_NAMESPACE)
    except Exception:  # noqa: BLE001
        return None
    return value.decode() if value else None


def sees_profilers_home(config: RayschedConfig) -> bool:
    """Whether this process's view of the home is the folder the profiler writes.

    False only when the profiler published an id that this node's folder does not hold:
    a node without the head's storage, whose folder of the same path nobody reads.
    Unknown (no id published, Ray's KV unreachable) counts as yes: a single machine,
    or a profiler from before ids.
    """
    published = published_home_id(config)
    return published is None or read_home_id(config) == published


_lock = threading.Lock()
_config: RayschedConfig | None = None
_configured_here = False  # configure() was called in this process


def get_config() -> RayschedConfig:
    """The process's config: built once from the environment unless ``configure`` set one."""
    global _config
    with _lock:
        if _config is None:
            _config = _absolute(RayschedConfig.from_env())
        return _config


def _absolute(config: RayschedConfig) -> RayschedConfig:
    # Workers and actors run with another working directory: ship an absolute home.
    return config.replace(home=str(config.home_path))


def configure(config: RayschedConfig | None = None, **changes: object) -> RayschedConfig:
    """Set the process's config: a whole RayschedConfig, or changes to the current one."""
    global _config, _configured_here
    if config is not None and not isinstance(config, RayschedConfig):
        raise InvalidInput(f"configure() takes a RayschedConfig or keyword changes (configure(max_attempts=3)), "
                           f"not a {type(config).__name__}: {config!r}"[:300])
    base = config or get_config()
    env_home = os.environ.get(HOME_ENV)
    if config is not None and env_home and "home" not in changes and config.home == _DEFAULT_HOME \
            and os.path.abspath(os.path.expanduser(env_home)) != os.path.abspath(_DEFAULT_HOME):
        # A whole config built with RayschedConfig(...) has the default home, and only
        # from_env reads the variable: rows and models would go where the user did not say.
        warnings.warn(f"raysched.configure: this RayschedConfig's home is the default {_DEFAULT_HOME!r}, not "
                      f"{HOME_ENV}={env_home!r}; build it with RayschedConfig.from_env(...) (or home=...) to use "
                      "the variable", stacklevel=3)
    new = _absolute(base.replace(**changes) if changes else base)
    with _lock:
        _config = new
        _configured_here = True
    from .client import reset_client  # the client caches bundles sized under the old config

    reset_client()
    return new


def configured_here() -> bool:
    """Whether this process set its config with ``configure`` (rather than taking the defaults,
    the environment's, or a driver's that its task brought)."""
    return _configured_here


def adopt_config(config: RayschedConfig) -> None:
    """In a worker, take the config of the driver whose task runs here (it travels with the
    task): calls this task submits are then sized as the driver configured them, not from
    the environment's defaults. A process that called ``configure`` itself keeps its own."""
    global _config
    with _lock:
        if _configured_here or _config == config:
            return
        _config = config
    # A client holds bundles sized by the old config.  A worker that never submitted a
    # call has none: importing the client module to reset nothing cost a task's first
    # run in each worker process ~0.2 s (it pulls in pandas and pyarrow), 0.7 s on busy cores.
    client = sys.modules.get(__name__.rsplit(".", 1)[0] + ".client")
    if client is not None:
        client.reset_client()


def session_token() -> str | None:
    """Identifies the current Ray session, so caches tied to one can tell a new one.

    The cluster's session name (unique per start of a cluster) and the job: the job
    id alone is ``01000000`` for the first driver of every new local cluster, so a
    ``ray.shutdown()`` and ``ray.init()`` in one process kept handles of the dead one.
    """
    if not ray.is_initialized():
        return None
    parts = []
    for part in ("get_session_name", "get_job_id"):
        try:
            parts.append(str(getattr(ray.get_runtime_context(), part)()))
        except Exception:  # noqa: BLE001 - not every kind of connection (Ray Client) has both
            parts.append(_node_session_name() if part == "get_session_name" else "")
    return "/".join(parts) if any(parts) else None


def _node_session_name() -> str:
    """The session name where the runtime context has no ``get_session_name`` (Ray 2.40):
    without it every new local cluster's token was "/01000000", and a new session went unseen."""
    try:
        return str(ray._private.worker.global_worker.node.session_name)
    except Exception:  # noqa: BLE001 - Ray Client: no node of its own
        return ""


def session_key() -> Any:
    """What ``session_token`` tells, for a check on every submission where only equality
    counts: the cluster's id and the job's as Ray holds them (0.6 us, against 2.6 us for
    the token's two runtime-context reads), or the token itself where Ray has no such pair."""
    try:
        return ray._private.worker.global_worker.current_cluster_and_job
    except Exception:  # noqa: BLE001 - not connected, or a Ray without it
        return session_token()


def ensure_ray() -> None:
    """Connect to Ray if the user has not: ``ray.init()`` joins a running cluster or starts one.

    Under a lock, and checked again inside it: threads that make their first calls
    together would otherwise each call ``ray.init()``, and all but one fail ("Perhaps you
    called ray.init twice by accident?").  Off the main thread, ``ray.init()`` runs in a
    thread of its own that lives as long as the process: the processes of a cluster it
    starts end with the thread that started them (a parent-death signal), so a cluster
    started by the first call of a worker thread died when that thread ended, under the
    calls of the others.
    """
    if ray.is_initialized():
        return
    with _init_lock:
        if ray.is_initialized():
            return
        # Ray >= 2.60 enables token authentication for a new local cluster unless told
        # otherwise; a user who has not chosen gets Ray's default, a test sets it.
        options = {"namespace": NAMESPACE, "log_to_driver": os.environ.get("RAYSCHED_LOG_TO_DRIVER", "1") == "1"}
        if threading.current_thread() is threading.main_thread():
            ray.init(**options)
            return
        started = threading.Event()
        failed: list[BaseException] = []

        def init_and_stay() -> None:
            try:
                ray.init(**options)
            except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
                failed.append(exc)
            finally:
                started.set()
            if failed:
                return
            # As long as this Ray session lasts: after ray.shutdown() what it started is
            # gone, and a thread kept for good per re-initialisation would pile up.
            token = session_token()
            if token is None:  # no way to tell when the session ends: for the life of the process
                threading.Event().wait()
            while _still_connected_to(token):
                time.sleep(_KEEPER_POLL_S)

        threading.Thread(target=init_and_stay, name="raysched-ray-init", daemon=True).start()
        started.wait()
        if failed:
            raise failed[0]


# Not Ray's own auto-init lock: ray.init() calls Ray APIs that take it while it is held here.
_init_lock = threading.Lock()
_KEEPER_POLL_S = 1.0


def _still_connected_to(token: str | None) -> bool:
    """Whether this process is still in the Ray session ``token`` names (asked again if unsure)."""
    try:
        return ray.is_initialized() and session_token() == token
    except Exception:  # noqa: BLE001 - a shutdown under way: the next look tells
        return True


class ClusterShapeCache:
    """The schedulable capacity of each alive node, refreshed at most every ``ttl_s``.

    ``ray.nodes()`` is one GCS round trip; sizing needs it on every submission, so
    it is cached.  A node that joins or leaves is seen within ``ttl_s``.
    """

    def __init__(self, ttl_s: float = 5.0, clock=time.monotonic):
        self._ttl = ttl_s
        self._clock = clock
        self._shape: ClusterShape | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def get(self) -> ClusterShape:
        now = self._clock()
        with self._lock:
            if self._shape is not None and now - self._at < self._ttl:
                return self._shape
        shape = read_cluster_shape()
        with self._lock:
            self._shape, self._at = shape, now
        return shape

    def invalidate(self) -> None:
        with self._lock:
            self._at = -float("inf")


def read_cluster_shape() -> ClusterShape:
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive", node.get("alive", False)):
            continue
        resources = node.get("Resources", {})
        nodes.append(
            NodeShape(
                node_id=node.get("NodeID", ""),
                num_cpus=float(resources.get("CPU", 0.0)),
                memory_bytes=int(resources.get("memory", 0)),
                resources=tuple(sorted((str(name), float(amount)) for name, amount in resources.items()
                                       if name not in ("CPU", "memory"))),
                labels=tuple(sorted((str(k), str(v)) for k, v in (node.get("Labels") or {}).items())),
            )
        )
    return ClusterShape(tuple(nodes))


#: A resource only the head node has (Ray's ``HEAD_NODE_RESOURCE_NAME``).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def get_or_create_actor(cls: type, name: str, *args: object,
                        concurrency_groups: Mapping[str, int] | None = None, **kwargs: object):
    """A cluster-wide service actor: found by name, created on first use, restarted by Ray.

    Detached so that every driver of the cluster finds the same one; restarted
    without end, and calls to it retried, so that a killed actor comes back and
    no batch sent to it is dropped; on the head node (as Ray Train's state actor),
    so that the profile store and the MLflow files are on one disk whichever driver
    created the actor and wherever Ray restarts it, and no worker node's loss takes
    it; no CPU of its own, so it never takes a slot a task could use; threaded, so
    a slow call (a training) does not hold up others.
    ``concurrency_groups``: extra thread pools (name: threads) that callers pick
    with ``.options(concurrency_group=name)``; the other calls share 16 threads.
    """
    ensure_ray()
    remote = ray.remote(concurrency_groups=dict(concurrency_groups)) if concurrency_groups else ray.remote
    return (
        remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
            resources={HEAD_NODE_RESOURCE: 0.001},
            max_concurrency=16,
        )
        .remote(*args, **kwargs)
    )
