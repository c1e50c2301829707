"""CPU used during a step by processes that are not part of the benchmark."""

from __future__ import annotations

import os
import time


class ForeignLoad:
    """CPU time used during a step by processes that are not part of the benchmark: not this
    process or its children, not a process whose command line names the work directory (the
    SeaweedFS and the mounts under test), not a kernel thread (their writeback is part of the
    work). A figure taken while something else used the CPU is not worth much: the table says
    so."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    @staticmethod
    def _procs() -> dict:
        """pid -> (parent pid, CPU ticks, command line, name)."""
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    st = f.read()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            rest = st[st.rindex(b")") + 2:].split()
            procs[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]), cmd,
                             st[st.index(b"(") + 1:st.rindex(b")")].decode(errors="replace"))
        return procs

    def _ticks(self) -> dict:
        procs = self._procs()
        ours = {os.getpid()}
        changed = True
        while changed:                      # this process's descendants
            changed = False
            for pid, (ppid, _, _, _) in procs.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        wd = self.workdir.encode()
        return {pid: (ticks, name) for pid, (_, ticks, cmd, name) in procs.items()
                if pid not in ours and cmd and not (wd and wd in cmd)}

    def start(self):
        return time.monotonic(), self._ticks()

    def stop(self, mark) -> tuple[float, float, str]:
        """(CPU seconds used by foreign processes, wall seconds, the busiest one's name)."""
        t0, before = mark
        after = self._ticks()
        hz = os.sysconf("SC_CLK_TCK")
        used = {pid: (ticks - before[pid][0]) / hz for pid, (ticks, _) in after.items()
                if pid in before}
        top = max(used, key=used.get, default=None)
        name = f"{after[top][1]} (pid {top}, {used[top]:.1f} s)" if top is not None else ""
        return sum(used.values()), time.monotonic() - t0, name
