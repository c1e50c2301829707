"""One Python thread state per libfuse worker thread, kept for the thread's life.

libfuse calls the FUSE adapter from its own worker threads, through ctypes. For a thread
Python did not start, each ctypes callback creates a thread state on entry and deletes it on
return (PyGILState_Ensure/Release with a count back at zero). In CPython 3.11 a new thread
state maps a 16 KiB frame stack and its deletion unmaps it, and every munmap in a
multi-threaded process makes the kernel flush the TLB of the other CPUs (an IPI), and the
new mapping page-faults again: a cost paid on every FUSE request, large next to a small
read's own work.

`pin()`, called at the start of every FUSE operation, takes one extra PyGILState_Ensure the
first time it runs in a worker thread and never releases it: the count then never returns
to zero and the thread keeps its state (and its threading.local values) between callbacks.

libfuse ends worker threads beyond 10 idle ones. The state of an exited thread is unreachable
but still allocated, so each new pin first deletes the states of pinned threads whose task
is gone from /proc/self/task. Without /proc, or on another Python than CPython 3.11, nothing
is pinned: the callbacks then work as before, only slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading

log = logging.getLogger("ssecfs.fuse")

# threads Python started, by ident (threads only seen through threading.current_thread()
# are _DummyThread entries): private, so without them nothing is pinned
_active = getattr(threading, "_active", None)
_Dummy = getattr(threading, "_DummyThread", None)


def _task_alive(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")


class ThreadStatePins:
    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pinned: dict[int, int] = {}     # thread state address -> native thread id
        self.reaped = 0
        # CPython 3.11 only, the version this is built and tested on: the deletion of an
        # exited thread's state relies on its thread-state API (3.12 aborts in it)
        self.enabled = (platform.python_implementation() == "CPython"
                        and sys.version_info[:2] == (3, 11) and _active is not None
                        and _Dummy is not None
                        and _task_alive(threading.get_native_id()))
        if self.enabled:
            api = ctypes.pythonapi
            self._ensure = api.PyGILState_Ensure
            self._ensure.restype = ctypes.c_int
            self._ensure.argtypes = []
            self._get = api.PyThreadState_Get
            self._get.restype = ctypes.c_void_p
            self._get.argtypes = []
            self._clear = api.PyThreadState_Clear
            self._clear.restype = None
            self._clear.argtypes = [ctypes.c_void_p]
            self._delete = api.PyThreadState_Delete
            self._delete.restype = None
            self._delete.argtypes = [ctypes.c_void_p]

    @property
    def pinned(self) -> int:
        return len(self._pinned)

    def pin(self) -> None:
        """Keep the calling foreign thread's state alive (cheap after the first call)."""
        if self._local.__dict__.get("pinned") or not self.enabled:
            return
        known = _active.get(threading.get_ident())
        if known is not None and not isinstance(known, _Dummy):
            # a thread Python started (the main thread in single-threaded mode): its state
            # is Python's own, deleted by Python when the thread ends, never pinned here
            self._local.pinned = True
            return
        self._ensure()                    # held for the thread's life, never released
        state = self._get()
        tid = threading.get_native_id()
        with self._lock:
            self._reap_locked()
            self._pinned[state] = tid
        self._local.pinned = True

    def reap(self) -> None:
        """Delete the states of pinned threads that have exited (caller holds the GIL)."""
        with self._lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        for state, tid in list(self._pinned.items()):
            if _task_alive(tid):
                continue
            del self._pinned[state]
            self._clear(state)
            self._delete(state)
            self.reaped += 1
            log.debug("deleted the Python thread state of exited FUSE thread %d", tid)
