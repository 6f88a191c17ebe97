"""The worker's row buffer: batches, and what it holds while a batch is on its way (no Ray started)."""

from __future__ import annotations

import threading

from conftest import wait_for

from raysched.runtime.worker import RowSink


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

    sink = RowSink(0.05, send, hold=hold, send_wait_s=1.0)
    sink.add({"row_id": "a"})
    sink.add({"row_id": "b"})
    assert wait_for(lambda: holds, timeout=5)
    assert "released" not in events  # still buffered or on its way: the worker owns an object
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
