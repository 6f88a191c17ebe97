"""The lock that lets two xdist workers share the machine (tests/conftest.py): an ``alone`` test
waits for the other worker's running test, and keeps the next one out until it ends."""

from __future__ import annotations

import threading
import time

from conftest import MachineLock


def _in_thread(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_an_exclusive_hold_waits_for_a_shared_one_and_a_later_shared_one_waits_for_it(tmp_path):
    path = str(tmp_path / "machine.lock")
    running, alone, next_test = MachineLock(path), MachineLock(path), MachineLock(path)
    running.hold(exclusive=False)
    events: list[str] = []

    alone_thread = _in_thread(lambda: (alone.hold(exclusive=True), events.append("alone")))
    time.sleep(0.3)
    assert events == []  # the running test still holds the machine
    next_thread = _in_thread(lambda: (next_test.hold(exclusive=False), events.append("next")))
    time.sleep(0.3)
    assert events == []  # behind the waiting exclusive hold, though shared holds could share

    running.release()
    alone_thread.join(timeout=5)
    time.sleep(0.3)
    assert events == ["alone"]
    alone.release()
    next_thread.join(timeout=5)
    assert events == ["alone", "next"]
    for lock in (running, alone, next_test):
        lock.close()


def test_holds_can_be_shared_and_a_hold_already_held_is_kept(tmp_path):
    path = str(tmp_path / "machine.lock")
    first, second = MachineLock(path), MachineLock(path)
    first.hold(exclusive=False)
    second.hold(exclusive=False)  # does not wait
    first.hold(exclusive=False)  # held already: no release in between
    assert first.exclusive is False and second.exclusive is False
    first.release()
    second.release()
    first.hold(exclusive=True)
    assert first.exclusive is True
    first.release()
    assert first.exclusive is None
    first.close()
    second.close()
