"""Thread-state pins for libfuse worker threads (ssecfs/threadstates.py).

The threads here are real foreign threads, as libfuse makes them: pthread_create with a
ctypes callback as the start routine. A pthread key destructor calls a second callback in
the same thread when it exits (a thread_local destructor, run before the thread's pthread keys
are cleared), so "between two callbacks of one thread" is observable.
"""

from __future__ import annotations

import ctypes
import threading

import pytest

from helpers import wait_until
from ssecfs.mount.threadstates import ThreadStatePins

libc = ctypes.CDLL(None, use_errno=True)
START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
DTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, START,
                                ctypes.c_void_p]
libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
libc.__cxa_thread_atexit_impl.argtypes = [DTOR, ctypes.c_void_p, ctypes.c_void_p]
LIBC_SYMBOL = ctypes.cast(libc.pthread_create, ctypes.c_void_p).value   # "registered by libc"
state_now = ctypes.pythonapi.PyThreadState_Get
state_now.restype = ctypes.c_void_p

pytestmark = pytest.mark.skipif(not ThreadStatePins().enabled,
                                reason="needs CPython and /proc/self/task")


def run_foreign(first, at_exit=None) -> None:
    """Run `first` as a foreign thread's start routine and `at_exit` (if given) in the same
    thread when it ends; wait for the thread. Exceptions are re-raised here."""
    errors: list[BaseException] = []

    def guard(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    @DTOR
    def dtor(_arg):
        guard(at_exit)

    @START
    def start(_arg):
        guard(first)
        if at_exit is not None:
            libc.__cxa_thread_atexit_impl(dtor, None, LIBC_SYMBOL)
        return None

    tid = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(tid), None, start, None) == 0
    assert libc.pthread_join(tid.value, None) == 0
    if errors:
        raise errors[0]


def seen_between_callbacks(pin: bool) -> tuple[object, bool]:
    """(value of a threading.local set in the first callback as seen by the second, whether
    both callbacks ran with the same Python thread state)."""
    pins = ThreadStatePins()
    local = threading.local()
    seen: dict = {}

    def first():
        if pin:
            pins.pin()
        local.value = 42
        seen["state1"] = state_now()

    def second():
        seen["value"] = getattr(local, "value", None)
        seen["state2"] = state_now()

    run_foreign(first, second)
    return seen["value"], seen["state1"] == seen["state2"]


def test_without_a_pin_each_callback_gets_a_new_thread_state():
    # the premise: this is what costs a mmap/munmap pair (and a TLB shootdown) per FUSE call
    value, _ = seen_between_callbacks(pin=False)
    assert value is None


def test_a_pinned_thread_keeps_its_state_between_callbacks():
    value, same = seen_between_callbacks(pin=True)
    assert value == 42 and same


def test_states_of_exited_threads_are_deleted_at_the_next_pin():
    pins = ThreadStatePins()
    for n in range(1, 51):
        run_foreign(pins.pin)
        # each pin deleted the states of the threads gone before it: at most the one that
        # just ended and the one before it (its task may outlive pthread_join by a moment)
        assert pins.pinned + pins.reaped == n and pins.pinned <= 2, (n, pins.pinned)
    wait_until(lambda: (pins.reap(), pins.pinned == 0)[1], what="the last state reaped")
    assert pins.reaped == 50


def test_a_live_pinned_thread_is_not_reaped():
    pins = ThreadStatePins()
    inside = threading.Event()
    release = threading.Event()
    holder = {}

    def hold():
        pins.pin()
        holder["state"] = state_now()
        inside.set()
        release.wait(30)          # the GIL is released while waiting

    t = threading.Thread(target=run_foreign, args=(hold,))
    t.start()
    assert inside.wait(30)
    try:
        run_foreign(pins.pin)     # a second worker pins: the first one is alive, kept
        assert pins.pinned == 2 and pins.reaped == 0
        # the second has exited: reaped; the first is still alive and kept
        wait_until(lambda: (pins.reap(), pins.reaped == 1)[1], what="the second reaped")
        assert pins.pinned == 1
    finally:
        release.set()
        t.join(30)
    wait_until(lambda: (pins.reap(), pins.pinned == 0)[1], what="the first reaped")
    assert pins.reaped == 2


def test_python_threads_are_never_pinned():
    pins = ThreadStatePins()
    pins.pin()                                    # the main thread
    t = threading.Thread(target=pins.pin)
    t.start()
    t.join()
    assert pins.pinned == 0
