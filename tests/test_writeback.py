"""The write-back scheduler (ssecfs.fs.writeback): coalescing, retries with backoff, quiesce,
waiters, expedite. No sleeps: every wait is on an event or a deadline."""

from __future__ import annotations

import threading
import time

import pytest

from ssecfs.fs import writeback as wbmod
from ssecfs.errors import StoreUnavailable
from ssecfs.fs.writeback import WriteBack


class Recorder:
    """An upload function: records (item, start time); can fail or block on demand."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple[object, float]] = []
        self.fail_next: dict[object, int] = {}
        self.block: dict[object, threading.Event] = {}
        self.started: dict[object, threading.Event] = {}
        self.done = threading.Condition(self.lock)
        self.ok: list[object] = []

    def started_event(self, item) -> threading.Event:
        with self.lock:
            return self.started.setdefault(item, threading.Event())

    def __call__(self, item):
        with self.lock:
            self.calls.append((item, time.monotonic()))
            ev = self.started.setdefault(item, threading.Event())
            gate = self.block.get(item)
            fail = self.fail_next.get(item, 0)
            if fail:
                self.fail_next[item] = fail - 1
        ev.set()
        if gate is not None:
            assert gate.wait(20), "test never released the upload"
        if fail:
            raise StoreUnavailable(f"injected failure of {item}")
        with self.lock:
            self.ok.append(item)

    def count(self, item) -> int:
        with self.lock:
            return sum(1 for i, _ in self.calls if i == item)


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def make_wb(rec):
    made = []

    def make(**kw) -> WriteBack:
        w = WriteBack(rec, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def test_coalescing(make_wb, rec):
    wb = make_wb(delay=0.4, workers=2)
    t0 = time.monotonic()
    for _ in range(5):
        wb.schedule("a")
    last = time.monotonic()
    assert rec.started_event("a").wait(10)
    assert wb.wait(lambda: wb.pending() == 0, timeout=10)
    assert rec.count("a") == 1, "several schedules within the delay make one upload"
    started = rec.calls[0][1]
    assert started - last >= 0.4 - 0.02, "the upload waited for the delay after the last schedule"
    assert started - t0 < 5
    assert wb.uploads_done == 1 and wb.upload_errors == 0


def test_coalescing_is_bounded_by_max_coalesce(make_wb, rec):
    wb = make_wb(delay=0.5, workers=1, max_coalesce=1.0)
    first = time.monotonic()
    ev = rec.started_event("a")
    wb.schedule("a")
    while not ev.wait(0.02):                 # keep re-scheduling: a file written continuously
        wb.schedule("a")
        assert time.monotonic() - first < 10, "never uploaded"
    started = rec.calls[0][1]
    assert 1.0 - 0.02 <= started - first < 4


def test_separate_items_upload_separately(make_wb, rec):
    wb = make_wb(delay=0, workers=2)
    for item in ("a", "b", "c"):
        wb.schedule(item)
    assert wb.wait(lambda: len(rec.ok) == 3, timeout=10)
    assert sorted(rec.ok) == ["a", "b", "c"]


def test_retries_with_backoff_until_success(make_wb, rec):
    wb = make_wb(delay=0, workers=2)
    rec.fail_next["a"] = 2
    wb.schedule("a")
    assert wb.wait(lambda: "a" in rec.ok, timeout=20)
    times = [t for i, t in rec.calls if i == "a"]
    assert len(times) == 3
    # backoff: 0.2 * 2**n seconds times a jitter in [0.5, 1]
    assert times[1] - times[0] >= 0.2 - 0.02
    assert times[2] - times[1] >= 0.4 - 0.02
    assert wb.upload_errors == 2 and wb.uploads_done == 1
    assert "StoreUnavailable" in wb.last_error
    assert wb.pending() == 0


def test_backoff_capped_by_max_backoff(make_wb, rec):
    wb = make_wb(delay=0, workers=1, max_backoff=0.05)
    rec.fail_next["a"] = 4
    t0 = time.monotonic()
    wb.schedule("a")
    assert wb.wait(lambda: "a" in rec.ok, timeout=20)
    assert rec.count("a") == 5
    assert time.monotonic() - t0 < 2


def test_failure_of_any_exception_is_retried(make_wb, rec):
    calls = []

    def upload(item):
        calls.append(item)
        if len(calls) == 1:
            raise RuntimeError("boom")

    wb = WriteBack(upload, delay=0, workers=1, max_backoff=0.05)
    try:
        wb.schedule("x")
        assert wb.wait(lambda: len(calls) == 2 and wb.uploads_done == 1, timeout=10)
        assert "RuntimeError" in wb.last_error
    finally:
        wb.stop()


def hold_upload(wb, rec, item: str) -> threading.Event:
    """Schedule item and wait for its upload to start; it stays blocked until the returned
    event is set."""
    gate = threading.Event()
    rec.block[item] = gate
    wb.schedule(item)
    assert rec.started_event(item).wait(10)
    return gate


def quiesce_in_thread(wb, item: str):
    result = []
    t = threading.Thread(target=lambda: result.append(wb.quiesce(item)))
    t.start()
    return t, result


def test_quiesce_waits_for_in_flight_upload(make_wb, rec):
    wb = make_wb(delay=0, workers=2)
    gate = hold_upload(wb, rec, "a")
    assert wb.in_flight() == 1
    t, result = quiesce_in_thread(wb, "a")
    t.join(0.3)
    assert t.is_alive(), "quiesce returned while an upload of the item was in flight"
    assert "a" not in rec.ok
    gate.set()
    t.join(10)
    assert not t.is_alive()
    assert "a" in rec.ok, "quiesce returned before the upload in flight ended"
    assert result == [False]
    assert wb.in_flight() == 0


def test_quiesce_removes_queued_item(make_wb, rec):
    wb = make_wb(delay=30, workers=1)
    wb.schedule("b")
    assert wb.pending() == 1
    assert wb.quiesce("b") is True
    assert wb.pending() == 0
    assert wb.quiesce("b") is False
    wb.expedite_all()                       # must not bring it back
    wb.schedule("c", delay=0)
    assert wb.wait(lambda: "c" in rec.ok, timeout=10)
    assert rec.count("b") == 0


def test_quiesce_of_item_rescheduled_during_upload(make_wb, rec):
    """Re-scheduled while in flight: quiesce reports it was queued and no second upload runs."""
    wb = make_wb(delay=0, workers=2)
    gate = hold_upload(wb, rec, "a")
    wb.schedule("a")                        # the file changed again during the upload
    t, result = quiesce_in_thread(wb, "a")
    gate.set()
    t.join(10)
    assert result == [True]
    wb.schedule("z", delay=0)
    assert wb.wait(lambda: "z" in rec.ok and wb.in_flight() == 0, timeout=10)
    assert rec.count("a") == 1


def test_quiesce_of_failing_upload_drops_the_retry(make_wb, rec):
    wb = make_wb(delay=0, workers=1)
    rec.fail_next["a"] = 1
    gate = hold_upload(wb, rec, "a")
    t, result = quiesce_in_thread(wb, "a")
    gate.set()
    t.join(10)
    assert result == [True], "the failed attempt re-queued the item: quiesce reports it"
    assert wb.pending() == 0
    wb.expedite_all()
    wb.schedule("z", delay=0)
    assert wb.wait(lambda: "z" in rec.ok, timeout=10)
    assert rec.count("a") == 1


def test_wait_returns_false_on_timeout(make_wb):
    wb = make_wb(delay=0, workers=1)
    t0 = time.monotonic()
    assert wb.wait(lambda: False, timeout=0.3) is False
    elapsed = time.monotonic() - t0
    assert 0.3 - 0.02 <= elapsed < 3


def test_wait_returns_true_when_predicate_holds(make_wb, rec):
    wb = make_wb(delay=0.2, workers=1)
    assert wb.wait(lambda: True, timeout=0.01) is True
    wb.schedule("a")
    t0 = time.monotonic()
    assert wb.wait(lambda: "a" in rec.ok, timeout=10) is True
    assert time.monotonic() - t0 < 5


def test_expedite_skips_delay(make_wb, rec):
    wb = make_wb(delay=60, workers=1)
    wb.schedule("a")
    t0 = time.monotonic()
    wb.expedite("a")
    assert wb.wait(lambda: "a" in rec.ok, timeout=10)
    assert time.monotonic() - t0 < 5
    assert rec.count("a") == 1


def test_expedite_all_skips_delay(make_wb, rec):
    wb = make_wb(delay=60, workers=2)
    for item in ("a", "b"):
        wb.schedule(item)
    wb.expedite_all()
    assert wb.wait(lambda: len(rec.ok) == 2, timeout=10)


def test_expedite_skips_backoff(make_wb, rec, monkeypatch):
    monkeypatch.setattr(wbmod.random, "uniform", lambda a, b: 100.0)   # backoff of 40 s
    wb = make_wb(delay=0, workers=1)
    rec.fail_next["a"] = 1
    wb.schedule("a")
    assert wb.wait(lambda: wb.upload_errors == 1 and wb.in_flight() == 0, timeout=10)
    assert wb.pending() == 1 and "a" not in rec.ok
    t0 = time.monotonic()
    wb.expedite("a")
    assert wb.wait(lambda: "a" in rec.ok, timeout=10)
    assert time.monotonic() - t0 < 5


def test_stop_ends_workers(rec):
    wb = WriteBack(rec, delay=0, workers=3)
    wb.schedule("a")
    assert wb.wait(lambda: "a" in rec.ok, timeout=10)
    wb.stop()
    assert not any(t.is_alive() for t in wb._threads)


# ------------------------------------------------------------------------------ bursts
def test_in_a_burst_items_go_once_settled_not_after_the_whole_delay(make_wb, rec):
    wb = make_wb(delay=30, workers=2, settle=0.05, burst=4)
    t0 = time.monotonic()
    items = [f"f{i}" for i in range(10)]
    for item in items:
        wb.schedule(item)
    assert wb.wait(lambda: len(rec.ok) == 10, timeout=10), "a burst waited for the delay"
    assert all(start - t0 >= 0.05 - 0.02 for _, start in rec.calls), "settled first"


def test_below_a_burst_the_delay_holds(make_wb, rec):
    wb = make_wb(delay=0.5, workers=2, settle=0.05, burst=4)
    t0 = time.monotonic()
    for item in ("a", "b", "c"):
        wb.schedule(item)
    assert wb.wait(lambda: len(rec.ok) == 3, timeout=10)
    assert min(start for _, start in rec.calls) - t0 >= 0.5 - 0.02


def test_in_a_burst_repeated_saves_of_one_file_still_coalesce(make_wb, rec):
    wb = make_wb(delay=30, workers=2, settle=0.2, burst=4, max_coalesce=60)
    for i in range(8):                       # a burst that stays: held back by a hold
        wb.hold(f"h{i}")
        wb.schedule(f"h{i}")
    end = time.monotonic() + 0.6
    while time.monotonic() < end:            # saved again well within `settle`, for a while
        wb.schedule("doc")
        assert rec.count("doc") == 0, "uploaded between two saves"
        time.sleep(0.02)   # the pace of the saves (the test's input), not a wait for a result
    assert wb.wait(lambda: rec.count("doc") == 1, timeout=10)
    assert rec.count("doc") == 1


# ------------------------------------------------------------------------------ batches
class Batcher(Recorder):
    """upload_many: records each batch; an item named "fail..." fails, the rest succeed."""

    def __init__(self):
        super().__init__()
        self.batches: list[list] = []

    def many(self, items):
        with self.lock:
            self.batches.append(list(items))
        return [StoreUnavailable(f"injected failure of {i}") if str(i).startswith("fail")
                else None for i in items]


def test_small_items_waiting_for_a_worker_go_in_batches(rec):
    """With upload_many, a worker takes the small items ready at once, up to `batch`; a
    big one goes alone, through upload; a failure in a batch retries that item only."""
    b = Batcher()
    gate = threading.Event()
    b.block["blocker"] = gate
    wb = WriteBack(b, delay=0, workers=1, upload_many=b.many, batch=4, max_backoff=0.05,
                   small=lambda i: str(i) != "big" and i != "blocker")
    try:
        wb.schedule("blocker")                   # the only worker is busy with it...
        assert b.started_event("blocker").wait(10)
        for item in ("s1", "s2", "big", "s3", "s4", "fail1", "s5"):
            wb.schedule(item)                    # ...while these wait, due at once
        gate.set()
        assert wb.wait(lambda: wb.pending() == 0, timeout=10)
        assert b.count("big") == 1 and wb.upload_errors == 1
        batched = [i for batch in b.batches for i in batch]
        # in order: s1 s2 | big (alone) | s3 s4 fail1 s5
        assert b.batches[:2] == [["s1", "s2"], ["s3", "s4", "fail1", "s5"]]
        assert "big" not in batched and "blocker" not in batched
        assert sorted(set(batched)) == ["fail1", "s1", "s2", "s3", "s4", "s5"]
        assert b.count("fail1") == 1             # retried alone (all else done): upload
        assert all(batched.count(i) == 1 for i in ("s1", "s2", "s3", "s4", "s5"))
        assert wb.uploads_done == 8              # blocker, big, s1..s5, fail1
    finally:
        wb.stop()


def test_a_new_item_wakes_one_idle_worker_not_all(monkeypatch):
    """A burst of items costs one wake-up of an idle worker per item (plus the chain to
    the next worker while more are ready), not a wake-up of every worker per item."""
    woken = []
    real_wait = threading.Condition.wait

    def counting_wait(self, timeout=None):
        r = real_wait(self, timeout)
        if threading.current_thread().name.startswith("upload-"):
            woken.append(1)
        return r
    done = []
    wb = WriteBack(done.append, delay=30, workers=32)
    try:
        monkeypatch.setattr(threading.Condition, "wait", counting_wait)
        for i in range(50):
            wb.schedule(i)                       # not due for 30 s: nothing to do yet
            time.sleep(0.002)                    # (pacing: time for woken workers to run)
        monkeypatch.undo()
        assert len(woken) < 50 * 4, len(woken)   # all 32 woken per item: about 1,600
        assert done == []
    finally:
        wb.stop()
