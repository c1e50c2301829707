"""Runs the workloads: every column's steps, run after run, each step after settle()."""

from __future__ import annotations

import threading
import time

from . import tools
from .common import BenchError, fmt, log_tail, progress
from .fs_workloads import MountWorkloads
from .mounts import BaselineTarget, RcloneTarget, S3fsTarget, SsecfsTarget
from .raw_awscrt import CrtRaw
from .raw_boto3 import Boto3Raw
from .rows import RAW_ROWS, ROW_STEP

FOREIGN_MAX = 0.1      # CPUs used by processes outside the benchmark before a figure is flagged


def run_all(b) -> None:
    raw_steps = [s for s in b.steps if any(ROW_STEP[r] == s for r in RAW_ROWS)]
    if raw_steps:
        b.raw = [Boto3Raw(b), CrtRaw(b)]
    b.targets.append(SsecfsTarget(b))
    if b.args.baseline:
        b.targets.append(BaselineTarget(b, b.args.baseline))
        b.notes.append(f"baseline: ssecfs at git revision {b.args.baseline}, same options")
    if b.args.compare:
        for binary, cls in (("s3fs", S3fsTarget), ("rclone", RcloneTarget)):
            if tools.apt_install(binary, binary):
                b.targets.append(cls(b))
            else:
                b.notes.append(f"{cls.column} could not be installed")
                b.record_unavailable(cls.column, b.steps, f"{binary} not installed")
    # Runs are interleaved (the raw clients' run 1, each mount's run 1, then run 2, ...):
    # SeaweedFS slows down as it fills, so running every run of one column first would favour it.
    mounted = [t for t in b.targets if mount_target(b, t)]
    for run_no in range(1, b.args.runs + 1):
        for client in b.raw:
            run_column(b, client, raw_steps, run_no)
        for t in mounted:
            run_column(b, MountWorkloads(b, t), b.steps, run_no, t)
    for t in mounted:
        unmount_target(b, t)


def run_column(b, work, steps: list[str], run_no: int, target=None) -> None:
    progress(f"== {work.column}, run {run_no}")
    for step in steps:
        if target is not None and not remount_if_broken(b, target, step):
            continue
        progress(f"{work.column}: {step} (run {run_no})")
        settle(b)
        run_step(b, work, step, run_no, target)
        if target is not None:
            note_log_errors(b, target, step)
    clear_bucket(b, work)


def clear_bucket(b, work) -> None:
    """After a column's run, untimed: its objects go (every run writes files of its own
    names; kept, five runs of five columns would fill the disk), and settle() compacts them
    away before the next step."""
    t = getattr(work, "t", None)
    bucket, have = (t.bucket, t.have) if t is not None else (work.bucket, work.have)
    keys = list(b.poller.listing(bucket, ""))
    for i in range(0, len(keys), 1000):
        b.poller.s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
    have.clear()
    progress(f"{work.column}: the run's {len(keys)} objects deleted (untimed)")


def run_step(b, work, step: str, run_no: int, target) -> None:
    """One step, timed by the workload; foreign CPU, a hang and the proxy watched around it."""
    watchdog = start_watchdog(b, target, step) if target is not None else None
    mark = b.foreign.start()
    if b.proxy:
        b.proxy.mark()
    try:
        vals, extra = work.run(step, run_no)
        b.record(work.column, vals, extra)
        progress(f"{work.column}: " + ", ".join(f"{k} = {fmt(v)}" for k, v in vals.items()))
    except (BenchError, OSError) as e:
        msg = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
        progress(f"{work.column}: {step} FAILED: {msg}")
        if target is not None:
            progress(f"{work.column}: log {target.log}, last lines:\n{log_tail(target.log, 15)}")
        b.record_error(work.column, step, msg)
    finally:
        if watchdog is not None:
            watchdog.set()
    if b.proxy:
        note_proxy(b, work.column, step)
    check_foreign(b, mark, work.column, step, run_no)


def note_proxy(b, column: str, step: str) -> None:
    s = b.proxy.step()
    b.proxy_steps.setdefault((column, step), []).append(s)
    progress(f"{column}: delay proxy {s['cpu_s']:.2f} CPU-s in {s['wall_s']:.1f} s, "
             f"{s['bytes'] / 1e6:.0f} MB, {s['connections']} connections, release timers "
             f"at most {s['late_max_ms']:.1f} ms late (mean {s['late_mean_ms']:.2f})")


def remount_if_broken(b, t, step: str) -> bool:
    if t.healthy():
        return True
    progress(f"{t.column}: mount not usable before {step}; remounting")
    try:
        t.cleanup()
        t.mount()
        return True
    except Exception as e:  # noqa: BLE001
        b.record_error(t.column, step, f"mount unusable: {e}")
        return False


def note_log_errors(b, t, step: str) -> None:
    errs = t.extra_log_errors()
    if errs:
        progress(f"{t.column}: the daemon logged {len(errs)} error line(s) during "
                 f"{step} ({t.log}):\n  " + "\n  ".join(errs[:5]))
        b.log_errors.setdefault(t.column, []).extend(f"{step}: {ln}" for ln in errs[:20])


def settle(b) -> None:
    """Before each step, untimed, so that no step pays for what an earlier one (of any
    column) left behind:
    - SeaweedFS compacts the volumes holding data deleted so far. Its own sweep (every 14
      minutes by default, seconds of CPU) is off, so it never lands inside a timed step,
      slowing down whichever column happens to run then.
    - Dirty pages are written (sync) and the page cache is dropped (as root). Otherwise
      the kernel writes the GiB SeaweedFS stored in the previous step during this one; and on
      a VM whose freed memory goes back to its host, new page cache costs a fault in the host
      per page once the recently freed memory is used up, so a step's figure would depend on
      how much page cache the steps before it had taken."""
    t = time.monotonic()
    try:
        b.sw.vacuum()
    except Exception as e:  # noqa: BLE001 - the step can still run; say so
        progress(f"SeaweedFS vacuum failed ({e}); its deleted data stays until later")
        b.vacuum_failed += 1
    else:
        took = time.monotonic() - t
        b.vacuum_s += took
        if took >= 1:
            progress(f"SeaweedFS compacted its deleted data ({took:.1f} s, untimed)")
    t = time.monotonic()
    b.drop_caches()
    b.flush_s += time.monotonic() - t


def check_foreign(b, mark, column: str, step: str, run_no: int) -> None:
    """Say so (progress line and a note under the table) when processes outside the
    benchmark used more than FOREIGN_MAX of a CPU while a step ran."""
    used, wall, top = b.foreign.stop(mark)
    if wall > 0 and used / wall > FOREIGN_MAX:
        msg = (f"WARNING: {column}, {step} run {run_no}: other processes used {used:.1f} "
               f"CPU-s in {wall:.1f} s (busiest: {top}); this figure is not clean")
        progress(msg)
        b.notes.append(msg)


def mount_target(b, t) -> bool:
    try:
        t.mount()
    except BenchError as e:
        progress(f"{t.column}: {e}")
        b.record_unavailable(t.column, b.steps, f"mount failed: {e}")
        return False
    if b.versions.get(t.name) is None:
        b.versions[t.name] = tools.tool_version(t.name)
    return True


def unmount_target(b, t) -> None:
    try:
        t.unmount()
    except BenchError as e:
        progress(f"{t.column}: {e}")
        b.failed = True
    t.cleanup()


def start_watchdog(b, t, step: str) -> threading.Event:
    """Every `limit` seconds a step runs, say so (with the mount's status and log): a hang
    inside a FUSE call cannot be interrupted from here, but it should not go unseen."""
    limit = 180 + b.args.size_mb / 2
    done = threading.Event()
    t0 = time.monotonic()

    def bark():
        while not done.wait(limit):
            msg = (f"WARNING: {t.column} {step} still running after "
                   f"{time.monotonic() - t0:.0f}s (hung?)")
            status = t.status()
            if status:
                msg += f"\n{t.column} status:\n{status}\nlog {t.log}:\n{log_tail(t.log, 15)}"
            progress(msg)
    threading.Thread(target=bark, daemon=True).start()
    return done
