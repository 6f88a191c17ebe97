"""The worker's row buffer: batches, and what it holds while a batch is on its way (no Ray started)."""

from __future__ import annotations

import threading
from dataclasses import replace

from conftest import wait_for

from raysched.errors import StoreError
from raysched.runtime.rows import RowSink


def test_a_batch_is_sent_once_and_an_object_is_held_from_its_first_row_until_it_is_sent():
    sent: list[list[dict]] = []
    holds: list[object] = []
    events: list[str] = []
    gate = threading.Event()

    class Guard:
        def __del__(self):
            events.append("released")

    def hold():
        guard = Guard()
        holds.append(1)
        events.append("held")
        return guard

    def send(rows):
        gate.wait(5)  # the profiler is slow to take the batch
        events.append("sent")
        sent.append(rows)
        return None

    sink = RowSink(0.05, send, hold=hold)
    sink.add({"row_id": "a"})
    sink.add({"row_id": "b"})
    assert wait_for(lambda: holds, timeout=5)
    assert "released" not in events  # still buffered or being sent: the worker owns an object
    gate.set()
    assert wait_for(lambda: "released" in events, timeout=5)
    assert sent == [[{"row_id": "a"}, {"row_id": "b"}]]  # one batch, every row
    assert events == ["held", "sent", "released"]

    sink.add({"row_id": "c"})  # the next batch holds again
    assert wait_for(lambda: len(sent) == 2 and events.count("released") == 2, timeout=5)
    assert sent[1] == [{"row_id": "c"}]


def test_flush_without_ray_returns_what_send_returned():
    sink = RowSink(10.0, lambda rows: len(rows))
    sink.add({"row_id": "a"})
    assert sink.flush(wait_s=1.0) == 1  # not an ObjectRef: nothing to wait on
    assert sink.flush() is None  # nothing buffered


def test_the_next_batch_goes_while_the_last_is_in_flight_and_refs_are_kept_until_taken():
    """The profiler takes a while under load (group commit): the sink must not wait for it
    to send the next batch, and must drop a batch's ref once it is taken (an owned ref
    would keep Ray from ending the idle worker)."""
    sent: list[list[dict]] = []
    not_taken: set[int] = set()
    lock = threading.Lock()

    def send(rows):
        with lock:
            sent.append(rows)
            token = len(sent)
            not_taken.add(token)
        return token

    def unfinished(refs):
        with lock:
            return [r for r in refs if r in not_taken]

    sink = RowSink(0.05, send, unfinished=unfinished)
    sink.add({"row_id": "a"})
    assert wait_for(lambda: len(sent) == 1, timeout=5)
    sink.add({"row_id": "b"})
    assert wait_for(lambda: len(sent) == 2, timeout=5)  # batch 1 is still in flight
    assert sink.in_flight == 2
    with lock:
        not_taken.discard(1)
    assert wait_for(lambda: sink.in_flight == 1, timeout=5)  # the flush thread polls
    # flush(wait_s) waits for every batch in flight, not only its own, and gives up at the deadline.
    sink.add({"row_id": "c"})
    assert sink.flush(wait_s=0.2) == 3
    assert sink.in_flight == 2 and sent[2] == [{"row_id": "c"}]
    threading.Timer(0.1, lambda: not_taken.clear()).start()
    sink.flush(wait_s=5.0)
    assert sink.in_flight == 0
    assert [r["row_id"] for batch in sent for r in batch] == ["a", "b", "c"]


def test_a_batch_the_profiler_could_not_store_is_a_warning_in_the_worker(caplog):
    """The profiler's error came back on the batch's ref, which the worker dropped unread:
    rows were lost without a word above debug level."""
    failed = {2: StoreError("raysched store 'profiles': cannot write part (No space left on device)")}
    sent: list[list[dict]] = []

    def send(rows):
        sent.append(rows)
        return len(sent)

    sink = RowSink(60.0, send, unfinished=lambda refs: [], failure=failed.get)
    with caplog.at_level("WARNING", logger="raysched.runtime.rows"):
        sink.add({"row_id": "a"})
        sink.flush(wait_s=1.0)
        assert "could not store" not in caplog.text  # batch 1 was stored
        sink.add({"row_id": "b"})
        sink.flush(wait_s=1.0)
    assert sink.in_flight == 0
    assert "could not store a batch of this worker's profile rows" in caplog.text
    assert "No space left on device" in caplog.text


def test_the_sender_keeps_the_profilers_handle_alive_for_every_batch(monkeypatch, tmp_path):
    # Ray 2.40's actor method holds its actor weakly: the sender kept only the method, so
    # once the handle it looked up was collected every batch failed ("Lost reference to
    # actor") and was written to the store behind the profiler's back, which then never
    # trained on them.
    import gc
    import weakref

    from raysched.config import RayschedConfig
    from raysched.runtime import rows

    received: list[bytes] = []

    class Method:
        def __init__(self, actor_ref):
            self._actor_ref = actor_ref

        def options(self, **_):
            return Method(self._actor_ref)

        def remote(self, payload):
            if self._actor_ref() is None:
                raise RuntimeError("Lost reference to actor")
            received.append(payload)
            return "ref"

    class Profiler:
        @property
        def record(self):
            return Method(weakref.ref(self))

    monkeypatch.setattr(rows.ray, "get_actor", lambda name, namespace=None: Profiler())
    send = rows._ProfilerSender(RayschedConfig(home=str(tmp_path)))
    for batch in range(3):
        assert send([{"batch": batch}]) == "ref"
        gc.collect()
    assert len(received) == 3
    assert not (tmp_path / "profiles").exists()  # nothing went around the profiler


def test_a_batch_whose_profiler_was_lost_is_sent_again_to_the_one_found_now_then_written_directly():
    """A helper's audit: after the README's ``ray.kill`` of the profiler, 532 of 600 rows were
    lost, also those of calls made after a new profiler had started. A call to a killed
    actor's handle fails only later, on its ref, which the sink only logged, and the sender
    kept the dead handle for every later batch."""
    import ray

    dead = ray.exceptions.ActorDiedError()
    sent: list[tuple[str, list[dict]]] = []
    failures: dict[int, BaseException] = {}

    def send(rows):
        sent.append(("sent", rows))
        return len(sent)

    def resend(rows, direct):
        if direct:
            sent.append(("written", rows))
            return None
        return send(rows)

    sink = RowSink(60.0, send, unfinished=lambda refs: [], failure=failures.get, resend=resend)
    failures[1] = dead  # the profiler of the first batch was killed before it took it
    sink.add({"row_id": "a"})
    sink.flush(wait_s=1.0)
    assert sent == [("sent", [{"row_id": "a"}]), ("sent", [{"row_id": "a"}])]  # again, to the profiler found now
    assert sink.in_flight == 0

    # A profiler that keeps dying: sent again twice, then written to the store by the worker.
    sent.clear()
    failures.clear()
    failures.update({1: dead, 2: dead, 3: dead})
    sink.add({"row_id": "b"})
    sink.flush(wait_s=1.0)
    assert [how for how, _ in sent] == ["sent", "sent", "sent", "written"]
    assert all(rows == [{"row_id": "b"}] for _, rows in sent) and sink.in_flight == 0


def test_the_sender_looks_the_profiler_up_again_after_it_was_lost(monkeypatch, tmp_path):
    """Its handle is dropped when a batch is sent again: the new profiler gets the batch,
    and every later one."""
    from raysched.config import RayschedConfig
    from raysched.runtime import rows

    profilers: list[object] = []

    class Profiler:
        def __init__(self):
            self.got: list[bytes] = []
            profilers.append(self)
            this = self

            class Record:
                def options(self, **_):
                    return self

                def remote(self, payload):
                    this.got.append(payload)
                    return f"ref-{len(profilers)}"

            self.record = Record()

    monkeypatch.setattr(rows.ray, "get_actor", lambda name, namespace=None: Profiler())
    sender = rows._ProfilerSender(RayschedConfig(home=str(tmp_path)))
    assert sender([{"batch": 1}]) == "ref-1" and sender([{"batch": 2}]) == "ref-1"  # one lookup
    assert sender.resend([{"batch": 2}], direct=False) == "ref-2"  # looked up anew
    assert sender([{"batch": 3}]) == "ref-2"
    assert [len(p.got) for p in profilers] == [2, 2]
    assert sender.resend([{"row_id": "x" * 32, "function": "f"}], direct=True) is None  # the worker writes it


def _stored_row(tag: str) -> dict:
    return {"row_id": tag * 32, "function": "mod.f", "code_hash": "h1", "call_id": tag, "attempt": 1,
            "outcome": "ok", "timestamp": 1_700_000_000.5}


def test_rows_that_could_not_be_stored_are_kept_on_the_node_and_stored_at_the_next_write(monkeypatch, tmp_path,
                                                                                         caplog):
    """No profiler, and the worker's own write failed too (the home unwritable a while, the disk
    full): the batch was dropped with a log line, and the finished attempts' rows were lost."""
    import tempfile

    from raysched.config import RayschedConfig
    from raysched.runtime import rows
    from raysched.store.profiles import ProfileStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))

    def no_profiler(name, namespace=None):
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(rows.ray, "get_actor", no_profiler)
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles").write_text("")  # the store's folder cannot be made: every write fails
    config = RayschedConfig(home=str(home))
    sender = rows._ProfilerSender(config)
    with caplog.at_level("WARNING", logger="raysched.runtime.rows"):
        assert sender([_stored_row("a"), _stored_row("b")]) is None
    assert "kept them in" in caplog.text
    kept = list(rows.spool_dir(config).glob("rows-*.pkl"))
    assert len(kept) == 1 and str(rows.spool_dir(config)).startswith(str(tmp_path / "node-tmp"))

    (home / "profiles").unlink()  # the home is writable again
    assert sender([_stored_row("c")]) is None
    assert sorted(ProfileStore(home).read()["call_id"]) == ["a", "b", "c"]
    assert not list(rows.spool_dir(config).glob("rows-*.pkl"))  # stored once, then forgotten


def test_a_batch_the_profiler_could_not_store_is_written_by_the_worker():
    """The profiler's write failed (its home unwritable, say): the worker only warned, and the
    rows were lost; it writes them itself now (and keeps them on its node if that fails too)."""
    failed = {1: StoreError("raysched store 'profiles': cannot write part (No space left on device)")}
    written: list[tuple[list[dict], bool]] = []

    sink = RowSink(60.0, lambda rows: 1, unfinished=lambda refs: [], failure=failed.get,
                   resend=lambda rows, direct: written.append((rows, direct)))
    sink.add({"row_id": "a"})
    sink.flush(wait_s=1.0)
    assert written == [([{"row_id": "a"}], True)] and sink.in_flight == 0


def test_a_new_profiler_stores_the_rows_its_node_kept(monkeypatch, tmp_path):
    import tempfile

    from raysched.config import RayschedConfig
    from raysched.runtime import rows
    from raysched.runtime.profiler import Profiler
    from raysched.store.profiles import ProfileStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    config = RayschedConfig(home=str(tmp_path / "home"))
    assert rows.spool_rows(config, [_stored_row("a")], OSError("No space left on device")) is not None

    class Registry:
        def __getattr__(self, name):
            return lambda *a, **k: None

    Profiler(config, registry=Registry())
    assert list(ProfileStore(tmp_path / "home").read()["call_id"]) == ["a"]
    assert not list(rows.spool_dir(config).glob("rows-*.pkl"))


def test_a_flush_at_exit_waits_for_the_batch_the_flush_thread_is_sending():
    """The flush thread had taken the buffered rows and was still sending them (looking the
    profiler up, pickling): the last flush of an exiting worker found nothing buffered and
    nothing in flight and returned at once, and the process ended under the batch."""
    import time

    gate, sending = threading.Event(), threading.Event()
    taken: set[str] = set()

    def send(rows):
        sending.set()
        gate.wait(5)
        return "ref"

    sink = RowSink(0.01, send, unfinished=lambda refs: [r for r in refs if r not in taken])
    sink.add({"row_id": "a"})
    assert sending.wait(5)  # the flush thread holds the batch, not yet in flight

    def profiler():
        gate.set()
        time.sleep(0.3)
        taken.add("ref")

    started = time.monotonic()
    threading.Timer(0.2, profiler).start()
    sink.flush(wait_s=5.0)
    assert time.monotonic() - started >= 0.45  # until the batch was sent, then taken
    assert sink.in_flight == 0


def test_an_attempt_recorded_by_its_worker_and_again_by_the_retry_of_its_task_is_one_row(monkeypatch, tmp_path):
    """A worker that stops an attempt buffers its row, then writes the marker that tells Ray's
    retry of its task that the attempt is recorded (``worker._hand_over``). A worker that
    dies between the two (its row sent, no marker) had its attempt recorded twice: once
    by itself, once by the retry (``worker.recover``)."""
    from raysched.config import RayschedConfig
    from raysched.runtime import worker
    from raysched.runtime.rows import _build_rows
    from raysched.runtime.spec import AttemptSpec
    from raysched.store.profiles import ProfileStore
    from raysched.types import Allocation, Estimate, Features, MiB, Outcome, Prediction, Usage

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    first = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                        prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                        allocation=Allocation(num_cpus=1.0, memory_bytes=64 * MiB), config=RayschedConfig())
    usage = Usage(peak_rss_bytes=90 * MiB, start_rss_bytes=40 * MiB, cpu_seconds=1.0, wall_seconds=1.0)
    # The worker's own row of the stopped attempt, as its sink builds it...
    own = _build_rows([(first, Outcome.OOM_KILLED, usage, 1.0, 2.0, "stopped by raysched's monitor", "n", 1)])
    # ...and the one the retry of its task records for it, with its last live sample.
    recorded: list[dict] = []
    monkeypatch.setattr(worker, "get_sink", lambda config: RowSink(60.0, lambda rows: None))
    monkeypatch.setattr(RowSink, "add", lambda self, row: recorded.append(row))
    worker._record_for(first, Outcome.OOM_KILLED, usage, "worker died")
    # The next attempt's rows, and another call's, are their own.
    second = own + _build_rows([(replace(first, attempt=2), Outcome.OK, usage, 3.0, 4.0, "", "n", 1),
                                (first.with_call_id("c1"), Outcome.OK, usage, 3.0, 4.0, "", "n", 1)])
    store = ProfileStore(tmp_path)
    store.append(own + recorded)
    store.append(second[1:])
    rows = store.read("f")
    assert sorted(zip(rows["call_id"], rows["attempt"])) == [("c0", 1), ("c0", 2), ("c1", 1)], \
        rows[["call_id", "attempt", "outcome", "error"]]


def test_a_node_without_the_profilers_folder_keeps_rows_on_the_node_and_sends_them_to_the_profiler(
        monkeypatch, tmp_path, caplog):
    """A node without the head's storage has a folder of the home's path of its own, which
    nobody reads: rows the worker wrote there when the profiler did not answer were never
    learnt from, nor seen by ``raysched.profiles()``.  They are kept on the node now, and go to
    the profiler at a later batch once it answers; the file goes once the profiler stored them."""
    import pickle
    import tempfile

    from raysched.config import RayschedConfig
    from raysched.runtime import rows, session
    from raysched.store.profiles import ProfileStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    config = RayschedConfig(home=str(tmp_path / "home-on-this-node"))
    # The profiler (on the head) published its folder's id; this node's folder has none of it.
    monkeypatch.setattr(session, "published_home_id", lambda config: "id-of-the-heads-folder")

    class Ref:
        def __init__(self, payload, fails):
            self.payload, self.fails = payload, fails

    stored: list[dict] = []
    answers = {"profiler": False, "fails": False}

    class Record:
        def options(self, **_):
            return self

        def remote(self, payload):
            return Ref(payload, answers["fails"])

    class Profiler:
        record = Record()

    def get_actor(name, namespace=None):
        if not answers["profiler"]:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return Profiler()

    def get(ref, timeout=None):
        if ref.fails:
            raise RuntimeError("the profiler was lost")
        got = pickle.loads(ref.payload)
        stored.extend(got)
        return len(got)

    monkeypatch.setattr(rows.ray, "get_actor", get_actor)
    monkeypatch.setattr(rows.ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(rows.ray, "get", get)
    clock = [1000.0]
    monkeypatch.setattr(rows.time, "monotonic", lambda: clock[0])

    sender = rows._ProfilerSender(config)
    with caplog.at_level("WARNING", logger="raysched.runtime.rows"):
        assert sender([_stored_row("a"), _stored_row("b")]) is None  # no profiler
    assert "not the profiler's" in caplog.text
    assert not ProfileStore(config.home_path, writable=False).read().shape[0]  # nothing written here
    assert len(list(rows.spool_dir(config).glob("rows-*.pkl"))) == 1

    answers.update(profiler=True, fails=True)  # it answers, then is lost with the kept rows
    clock[0] += 11
    sender([_stored_row("c")])
    clock[0] += 11
    sender([_stored_row("d")])  # the kept rows' call failed: they are still kept, and sent again
    assert len(list(rows.spool_dir(config).glob("rows-*.pkl"))) == 1 and not stored
    answers["fails"] = False
    clock[0] += 11
    sender([_stored_row("e")])  # sent again...
    clock[0] += 11
    sender([_stored_row("f")])  # ...stored: the file goes
    assert sorted(r["call_id"] for r in stored) == ["a", "b"]
    assert not list(rows.spool_dir(config).glob("rows-*.pkl"))
    assert not ProfileStore(config.home_path, writable=False).read().shape[0]


def test_a_kept_rows_file_cut_short_is_set_aside_whether_stored_or_sent(monkeypatch, tmp_path, caplog):
    import tempfile

    from raysched.config import RayschedConfig
    from raysched.runtime import rows, session

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    for sees in (True, False):
        config = RayschedConfig(home=str(tmp_path / f"home-{sees}"))
        folder = rows.spool_dir(config)
        folder.mkdir(parents=True)
        (folder / "rows-00000000000000000001-1-abcd.pkl").write_bytes(b"\x80\x05cut")
        sent = []
        monkeypatch.setattr(session, "published_home_id", lambda config, sees=sees: None if sees else "the-heads")
        sender = rows._ProfilerSender(config)
        monkeypatch.setattr(sender, "_profiler_record", lambda payload: sent.append(payload) or "ref")
        with caplog.at_level("WARNING", logger="raysched.runtime.rows"):
            sender._maybe_store_spooled()
        assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == \
            ["rows-00000000000000000001-1-abcd.pkl.bad"], sees
        assert not sent and "left as" in caplog.text
