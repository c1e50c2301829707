"""The rows of the table, the steps that measure them, the columns, and the issues' targets."""

from __future__ import annotations

from .common import fmt

# row id, unit, the step that measures it, label template; rows in MB/s, files/s and IOPS are
# better higher, rows in s and MiB lower
TABLE = """
write_durable  MB/s     write         write {big} sequentially, until durable in the bucket
write_close    MB/s     write         write {big} sequentially, until close() returns
read_cold      MB/s     read_cold     read {big} cold
small_create   files/s  small_create  create {n} x 4 KiB files, until all durable
ls_cold        s        ls_cold       `ls -l` of those {n} files, cold
small_read     files/s  small_read    read those {n} files cold
small_delete   files/s  small_delete  delete those {n} files (`rm -r`), until gone from the bucket
mv_file        s        mv_file       `mv` a {mv} file, until durable
mv_dir         s        mv_dir        `mv` a directory of 100 files, until durable
fio            IOPS     fio           {fio} 4 KiB random reads, queue depth 1, file cached
rss            MiB      rss           daemon peak RSS while copying a {rss} file in
big_dir_ls     s        big_dir       `ls -l` of a {bigdir}-file directory written by another tool, cold
big_dir_ls2    s        big_dir       the same `ls -l` again, same mount
big_dir_rss    MiB      big_dir       daemon peak RSS over both listings
huge_rss_write MiB      huge          daemon peak RSS writing a {huge} file until durable
huge_rss_read  MiB      huge          daemon peak RSS reading it back cold
"""
HIGHER = {"MB/s", "files/s", "IOPS"}
# (row id, label template, unit, higher is better, step)
ROWS = [(rid, label, unit, unit in HIGHER, step)
        for rid, unit, step, label in (ln.split(maxsplit=3) for ln in TABLE.strip().splitlines())]
STEPS = ["write", "read_cold", "small_create", "ls_cold", "small_read", "small_delete",
         "mv_file", "mv_dir", "fio", "rss"]
MEMORY_STEPS = ["big_dir", "huge"]      # not in a default run: --memory or --only
ROW_STEP = {r[0]: r[4] for r in ROWS}
ROW_HIB = {r[0]: r[3] for r in ROWS}
ALIASES = {"read": "read_cold", "ls": "ls_cold", "create": "small_create",
           "small": "small_create", "mv": "mv_file", "mvdir": "mv_dir", "peak_rss": "rss"}

RAW = ["raw boto3", "raw awscrt"]           # clients without a filesystem
MOUNTS = ["ssecfs", "s3fs-fuse", "rclone"]
PEERS = ["s3fs-fuse", "rclone"]             # with --compare
# rows the raw clients have a figure for (the others are about a mounted filesystem)
RAW_ROWS = {"write_durable", "write_close", "read_cold", "small_create", "ls_cold",
            "small_read", "small_delete", "mv_file", "mv_dir"}

# Targets: (row: [(kind, value), ...]); a row's target is the strictest of its parts.
# kind "boto3": that ratio to raw boto3 in this run; "best": that ratio to the better of
# s3fs-fuse and rclone in this run; "abs": a value in the row's unit.
# Issue "Performance" (loopback): its targets were set next to the figures of its own table,
# so an absolute one is turned into a ratio to the better peer there (e.g. "create >= 500/s"
# next to rclone's 364/s = 1.37x rclone).
TARGETS_LOOPBACK = {
    "write_durable": [("boto3", 0.9)],
    "write_close": [("best", 300 / 590)],      # rclone 590 MB/s in the run
    "read_cold": [("boto3", 0.8)],
    "small_create": [("best", 500 / 364)],     # rclone 364 files/s
    "ls_cold": [("best", 0.5 / 0.68)],         # s3fs-fuse 0.68 s
    "small_read": [("best", 500 / 331)],       # rclone 331 files/s
    "mv_file": [("best", 2 / 2.1)],            # rclone 2.1 s (s3fs-fuse fails)
    "mv_dir": [("best", 0.5 / 0.73)],          # rclone 0.73 s
    "fio": [("best", 10000 / 26900)],          # s3fs-fuse 26,900 IOPS
}
# the daemon's peak RSS: one bound, 300 MiB, at any distance
RSS_BOUNDS = {r: [("abs", 300)] for r in ("rss", "big_dir_rss", "huge_rss_write",
                                          "huge_rss_read")}
TARGETS_LOOPBACK.update(RSS_BOUNDS)
# what a row's target says where this run has no figure to scale it with
HINTS_LOOPBACK = {r: f"{fmt(v)}; --compare scales it" for r, v in (
    ("write_close", 300), ("small_create", 500), ("ls_cold", 0.5), ("small_read", 500),
    ("mv_file", 2), ("mv_dir", 0.5), ("fio", 10000))}
HINTS_RTT = {r: "0.9× this row at --rtt 0" for r in ("write_durable", "read_cold")}
# Issue "Fast at a distance" (--rtt 20, and every row ahead of both peers at --rtt 50).
# Its big-file targets (>= 0.9x the same workload at --rtt 0) need a second run.
TARGETS_RTT = {
    "small_create": [("abs", 300), ("best", 1.5)],
    "ls_cold": [("abs", 0.3)],
    "small_read": [("abs", 250)],
    "small_delete": [("abs", 300)],
    **RSS_BOUNDS,
}


def targets(rtt: float | None) -> tuple[dict, dict]:
    """The targets of this kind of run, and the hints for rows it cannot scale."""
    return (TARGETS_RTT, HINTS_RTT) if rtt else (TARGETS_LOOPBACK, HINTS_LOOPBACK)


def selected_rows(only: str | None, memory: bool) -> list[str]:
    """The row ids a run measures, from --only and --memory; SystemExit on an unknown name."""
    mem_rows = {r[0] for r in ROWS if r[4] in MEMORY_STEPS}
    if not only:
        return [r[0] for r in ROWS if memory or r[0] not in mem_rows]
    want = set(mem_rows) if memory else set()
    for w in only.split(","):
        w = ALIASES.get(w.strip(), w.strip())
        if not w:
            continue
        if w in STEPS or w in MEMORY_STEPS:
            want |= {r for r, s in ROW_STEP.items() if s == w}
        elif w in ROW_STEP:
            want.add(w)
        else:
            raise SystemExit(f"bench: unknown workload {w!r}; choose from "
                             f"{', '.join(STEPS + MEMORY_STEPS + [r[0] for r in ROWS])}")
    return [r[0] for r in ROWS if r[0] in want]


def steps_of(rows: list[str]) -> list[str]:
    """The steps that measure these rows, in the order they run."""
    wanted = {ROW_STEP[r] for r in rows}
    return [s for s in STEPS + MEMORY_STEPS if s in wanted]
