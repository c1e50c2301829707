"""The report: the markdown table, the notes under it, the machine line, the JSON."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess

from seaweed import weed_binary

from .common import DIR_FILES, GiB, fmt, human
from .rows import (PEERS, RAW, RAW_ROWS, ROW_HIB, ROW_STEP, ROWS, STEPS,
                   MEMORY_STEPS, targets)

COLUMNS = [*RAW, "ssecfs", "baseline", *PEERS]


def cell(b, column: str, row: str):
    """(text, value or None): the median of the runs, or why there is none."""
    if column in RAW and row not in RAW_ROWS:
        return "–", None
    if row in b.errors.get(column, {}):
        return "fails", None
    vals = b.results.get(column, {}).get(row)
    if not vals:
        return "–", None
    v = statistics.median(vals)
    return fmt(v), v


def ratio(s_val, other, text: str = "") -> str:
    return f"{s_val / other:.2f}×{text}" if s_val is not None and other else "–"


def ratio_text(rid: str, text: dict, peers: list[str]) -> str:
    """ssecfs ÷ raw boto3, or ÷ the better peer where boto3 has no figure."""
    s_val, b_val = text["ssecfs"][1], text["raw boto3"][1]
    if b_val or s_val is None:
        return ratio(s_val, b_val)
    others = [(text[c][1], c) for c in peers if text[c][1]]
    if not others:
        return "–"
    best = (max if ROW_HIB[rid] else min)(others)
    return ratio(s_val, best[0], f" vs {best[1]}")


def sizes(b) -> dict:
    return {"big": human(b.size), "n": f"{b.n:,}", "mv": human(b.mv_size),
            "rss": human(b.rss_size), "fio": b.fio_label, "bigdir": f"{b.big_dir_n:,}",
            "huge": human(b.huge_size)}


def table(b) -> str:
    peers = PEERS if b.args.compare else []
    base = ["baseline", "÷ baseline"] if b.args.baseline else []
    head = ["workload", *RAW, "ssecfs", "ratio", "÷ awscrt", *base, *peers, "target, this run"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for rid, label, unit, _, _ in ROWS:
        if rid not in b.rows:
            continue
        text = {c: cell(b, c, rid) for c in COLUMNS}
        name = label.format(**sizes(b)) + f" ({unit})"
        if rid == "fio" and b.fio_desc:
            name += f" [{b.fio_desc}]"
        lines.append("| " + " | ".join(
            [name, *[text[c][0] for c in RAW], text["ssecfs"][0], ratio_text(rid, text, peers),
             ratio(text["ssecfs"][1], text["raw awscrt"][1]),
             *([text["baseline"][0], ratio(text["ssecfs"][1], text["baseline"][1])]
               if base else []),
             *[text[c][0] for c in peers],
             target_text(b, rid, text)]) + " |")
    return "\n".join(lines)


def target(b, rid: str, text: dict) -> tuple[float | None, list[str]]:
    """The issue's target for this row in this run (the strictest of its parts that this
    run can scale), and the kinds it could not (no figure to scale from)."""
    hib = ROW_HIB[rid]
    values, missing = [], []
    for kind, v in targets(b.args.rtt)[0].get(rid, []):
        if kind == "abs":
            values.append(v)
            continue
        base = ([text["raw boto3"][1]] if kind == "boto3"
                else [text[c][1] for c in PEERS if text.get(c, ("", None))[1]])
        base = [x for x in base if x]
        if base:
            values.append(v * (max if hib else min)(base))
        else:
            missing.append(kind)
    return ((max if hib else min)(values) if values else None), missing


def target_text(b, rid: str, text: dict) -> str:
    t, missing = target(b, rid, text)
    sign = "≥" if ROW_HIB[rid] else "≤"
    if t is None:
        hint = targets(b.args.rtt)[1].get(rid)
        return f"(issue: {sign} {hint})" if hint else "–"
    s_val = text["ssecfs"][1]
    verdict = "" if s_val is None else (
        ": met" if (s_val >= t if ROW_HIB[rid] else s_val <= t) else ": not met")
    more = " (and vs the peers: --compare)" if "best" in missing else ""
    return f"{sign} {fmt(t)}{verdict}{more}"


def proxy_table(b) -> str:
    """With --rtt: what the delay proxy did in each step (medians over the runs)."""
    cols = [c for c in COLUMNS if any(k[0] == c for k in b.proxy_steps)]
    lines = ["| delay proxy: CPU-s / wall s, MB forwarded, timers late by at most (mean) | "
             + " | ".join(cols)
             + " |", "|---|" + "---:|" * len(cols)]
    for step in STEPS + MEMORY_STEPS:
        if not any(k[1] == step for k in b.proxy_steps):
            continue
        cells = []
        for c in cols:
            runs = b.proxy_steps.get((c, step))
            if not runs:
                cells.append("–")
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in ("cpu_s", "wall_s", "bytes")}
            late = max(r["late_max_ms"] for r in runs)
            mean = statistics.median(r["late_mean_ms"] for r in runs)
            cells.append(f"{med['cpu_s']:.2f} / {med['wall_s']:.1f}, "
                         f"{med['bytes'] / 1e6:,.0f}, {late:.1f} ms ({mean:.1f})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnotes(b) -> list[str]:
    runs = b.args.runs
    notes = [f"{'median of ' + str(runs) + ' runs' if runs > 1 else '1 run'}; MB = 10^6 bytes; "
             "ratio = ssecfs ÷ raw boto3 (or ÷ the better of s3fs-fuse/rclone where boto3 has "
             "no figure); ÷ awscrt = ssecfs ÷ raw awscrt, the fastest client; for s and MiB "
             "rows lower is better. \"target, this run\": the issue's target as a ratio to "
             "what it was set against (raw boto3, or the better of s3fs-fuse and rclone), "
             "times that figure in this run"
             + (" (issue \"Fast at a distance\": its figures at a 20 ms round trip)."
                if b.args.rtt else " (issue \"Performance\").")]
    if any(c in b.results or c in b.errors for c in RAW):
        notes.append("raw boto3 and raw awscrt send the same requests: 8 MiB parts and ranged "
                     "GETs, 10 at a time (boto3 threads, awscrt connections), the SSE-C headers "
                     "on every request about an object's content; awscrt's GET_OBJECT and "
                     "PUT_OBJECT carry the bodies, the other requests go one by one (its "
                     "DEFAULT type; the benchmark reads and writes the XML of ListObjectsV2 "
                     "and DeleteObjects).")
    notes += network_notes(b)
    notes.append(f"SeaweedFS compacted its deleted data before each step, untimed "
                 f"({b.vacuum_s:.0f} s in all"
                 + (f"; {b.vacuum_failed} compaction(s) failed" if b.vacuum_failed else "")
                 + "); its own periodic vacuum was off.")
    notes.append("Before each step, untimed, dirty pages were written (sync)"
                 + (" and the page cache dropped" if b.cold_ok else "")
                 + f" ({b.flush_s:.0f} s in all).")
    if b.args.ssecfs_args:
        notes.append(f"ssecfs mounted with extra arguments: {b.args.ssecfs_args}")
    if b.interrupted:
        notes.append("INTERRUPTED: partial results ('–' = not run)")
    notes.extend(b.notes)
    notes += error_notes(b)
    return notes


def network_notes(b) -> list[str]:
    proto = "https" if b.args.tls else "http"
    if b.args.compare and not b.args.tls:
        out = ["SeaweedFS on loopback; raw boto3, raw awscrt, ssecfs and s3fs-fuse over "
               "http, rclone over https (the AWS SDK for Go refuses SSE-C keys over http)."]
    else:
        out = [f"SeaweedFS on loopback over {proto}."]
    if b.args.rtt is not None:
        total = [s for runs in b.proxy_steps.values() for s in runs]
        cpu = sum(s["cpu_s"] for s in total)
        wall = sum(s["wall_s"] for s in total)
        late = max((s["late_max_ms"] for s in total), default=0.0)
        how = (f"{b.args.rtt / 2:g} ms each way, one more round trip before a new "
               "connection's first bytes, as a TCP handshake" if b.args.rtt
               else "no delay: what the proxy itself costs")
        timers = (f"; its release timers fired at most {late:.1f} ms late" if b.args.rtt
                  else "")
        out.append(f"--rtt {b.args.rtt:g}: every tool's endpoint behind the same delay proxy "
                   f"on loopback ({how}; nice {b.proxy.nice}); the durability poller talks to "
                   f"SeaweedFS directly. The proxy used {cpu:.1f} CPU-s over {wall:.0f} s of "
                   f"steps{timers} (per step: the table below).")
    return out


def error_notes(b) -> list[str]:
    notes = []
    for col, rows in b.errors.items():
        by_err: dict = {}
        for row, err in rows.items():
            by_err.setdefault(err, []).append(row)
        for err, rws in by_err.items():
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            text = " / ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
            notes.append(f"{col} fails ({', '.join(rws)}): {text[:400]}")
    for col, lines in b.log_errors.items():
        notes.append(f"{col} daemon logged {len(lines)} error line(s), e.g. {lines[0][:300]}")
    return notes


def versions(b) -> list[str]:
    from importlib.metadata import version

    import ssecfs
    b.versions.setdefault("ssecfs", ssecfs.__version__)
    pkgs = {}
    for name in ("boto3", "awscrt", "fusepy"):
        try:
            pkgs[name] = version(name)
        except Exception:  # noqa: BLE001
            pkgs[name] = "?"
    try:
        w = subprocess.run([weed_binary(), "version"], capture_output=True, text=True,
                           timeout=20).stdout.strip().splitlines()[0]
        weed = w.replace("version ", "").strip()
    except Exception:  # noqa: BLE001
        weed = "?"
    v = b.versions
    parts = [f"ssecfs {v.get('ssecfs')}", f"Python {platform.python_version()}",
             *[f"{k} {pkgs[k]}" for k in pkgs], f"SeaweedFS {weed}"]
    if b.args.compare:
        parts += [f"s3fs-fuse {v.get('s3fs', '?')}", f"rclone {v.get('rclone', '?')}"]
    if "fio" in v:
        parts.append(v["fio"])
    return parts


def machine(b) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    parts = versions(b)
    b.machine_info = {"nproc": os.cpu_count(), "cpu": cpu, "mem_bytes": mem,
                      "kernel": platform.release(), "versions": parts}
    return (f"machine: nproc {os.cpu_count()}, {cpu}, {mem / GiB:.1f} GiB RAM, Linux "
            f"{platform.release()}; " + ", ".join(parts))


def to_json(b, table_md: str, machine_line: str) -> dict:
    out = {"options": dict(vars(b.args)),
           "sizes": {"big": b.size, "mv_file": b.mv_size, "rss_copy": b.rss_size,
                     "small_files": b.n, "dir_files": DIR_FILES},
           "machine": getattr(b, "machine_info", {}), "machine_line": machine_line,
           "rows": {}, "table_markdown": table_md, "notes": footnotes(b),
           "daemon_log_errors": b.log_errors,
           "delay_proxy_steps": [{"column": c, "step": s, "runs": r}
                                 for (c, s), r in b.proxy_steps.items()]}
    for rid, label, unit, hib, _ in ROWS:
        if rid not in b.rows:
            continue
        cells = {c: cell(b, c, rid) for c in COLUMNS}
        row = {"label": label, "unit": unit, "higher_is_better": hib, "step": ROW_STEP[rid],
               "columns": {}, "target_this_run": target(b, rid, cells)[0]}
        for col in COLUMNS:
            vals = b.results.get(col, {}).get(rid)
            err = b.errors.get(col, {}).get(rid)
            if vals is None and err is None:
                continue
            row["columns"][col] = {
                "runs": vals or [], "median": statistics.median(vals) if vals and not err
                else None, "error": err, "detail": b.extras.get(col, {}).get(rid, [])}
        out["rows"][rid] = row
    return out
