"""The command line of scripts/bench."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

from . import __doc__ as METHOD
from . import driver, report
from .common import progress
from .rows import MEMORY_STEPS, STEPS
from .runner import Bench


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=METHOD.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(METHOD.split("\n\n")[1:]))
    p.add_argument("--size-mb", type=int, default=1024,
                   help="size of the big file in MiB (default 1024); the mv file is a quarter, "
                   "the RSS copy twice this")
    p.add_argument("--small-files", type=int, default=1000, help="number of 4 KiB files (1000)")
    p.add_argument("--runs", type=int, default=1, help="runs of each workload; report median")
    p.add_argument("--only", help="comma-separated workloads: " + ", ".join(STEPS + MEMORY_STEPS)
                   + " (or the row ids write_durable, write_close)")
    p.add_argument("--compare", action="store_true",
                   help="also run s3fs-fuse and rclone mount (apt-get installs them if missing)")
    p.add_argument("--rtt", type=float, metavar="MS",
                   help="put every tool's endpoint behind a proxy on loopback that delays each "
                   "direction by MS/2 (a round trip costs MS); 0 = through the proxy, no delay")
    p.add_argument("--tls", action="store_true",
                   help="talk https to SeaweedFS from the raw clients, ssecfs and s3fs too")
    p.add_argument("--pin", action="store_true",
                   help="run SeaweedFS on half of the CPUs and everything else on the other "
                        "half (as if the server were another machine)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run ssecfs as it was at git revision REV (its ssecfs/ package, "
                   "this venv), as the column \"baseline\"")
    p.add_argument("--ssecfs-args", default="",
                   help="extra arguments for `ssecfs mount`, "
                   "e.g. --ssecfs-args=\"--upload-workers 8\"")
    p.add_argument("--fio-runtime", type=float, default=10, help="seconds of random reads (10)")
    p.add_argument("--no-fio", action="store_true",
                   help="use the Python pread loop for the random-read row even if fio is there")
    p.add_argument("--memory", action="store_true",
                   help="also run the memory workloads (big_dir, huge; see below)")
    p.add_argument("--big-dir", type=int, default=100_000,
                   help="files in the big_dir directory (100000)")
    p.add_argument("--huge-gb", type=float, default=10,
                   help="size of the huge file in GiB (10)")
    p.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", help="where to make the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    if a.size_mb < 1 or a.small_files < 1 or a.runs < 1 or a.big_dir < 1 or a.huge_gb * 1024 < 1:
        p.error("--size-mb, --small-files, --runs, --big-dir and --huge-gb must be positive")
    if a.rtt is not None and not 0 <= a.rtt <= 10_000:
        p.error("--rtt must be between 0 and 10000 ms")
    return a


def print_report(bench: Bench, json_path: str | None) -> None:
    table = report.table(bench)
    machine = report.machine(bench)
    print(table)
    print()
    for n in report.footnotes(bench):
        print(f"- {n}")
    if bench.proxy_steps:
        print()
        print(report.proxy_table(bench))
    print()
    print(machine)
    sys.stdout.flush()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_json(bench, table, machine), f, indent=2)
        progress(f"results saved to {json_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount")):
        print("bench: needs FUSE (/dev/fuse and fusermount)", file=sys.stderr)
        return 1

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    bench = Bench(args)            # validates --only before anything starts
    rc = 0
    try:
        bench.setup()
        driver.run_all(bench)
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
        bench.interrupted = True
        rc = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        progress(f"bench failed: {type(e).__name__}: {e}")
        bench.failed = True
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    if bench.results or bench.errors:
        print_report(bench, args.json)
    if rc == 0 and any(col in bench.errors for col in ("raw boto3", "raw awscrt", "ssecfs")):
        rc = 1
    return rc
