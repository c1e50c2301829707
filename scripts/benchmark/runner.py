"""One run of the benchmark: its work directory, key, source data, SeaweedFS, the delay
proxy of --rtt, the endpoints every tool is given, and what was measured."""

from __future__ import annotations

import base64
import mmap
import os
import random
import shutil
import tempfile
import time

from seaweed import SeaweedFS, self_signed_cert

from . import tools
from .common import (DIR_FILES, MB, BenchError, GiB, MiB, SMALL, human, progress,
                     sse_params, write_secret)
from .load import ForeignLoad
from .poller import Poller
from .rtt import DelayProxy
from .rows import ROW_STEP, selected_rows, steps_of

VACUUM_NEVER = 365 * 86400  # s: SeaweedFS's own vacuum sweeps (default every 840 s) are off


class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size_mb * MiB
        self.mv_size = max(MiB, self.size // 4 // MiB * MiB)
        self.rss_size = 2 * self.size
        self.huge_size = int(args.huge_gb * GiB) // MiB * MiB
        self.big_dir_n = args.big_dir
        self.n = args.small_files
        self.timeout_big = 300 + args.size_mb           # seconds; twice that for the RSS copy
        self.timeout_small = 300 + self.n
        self.rows = selected_rows(args.only, args.memory)   # (validates --only first)
        self.steps = steps_of(self.rows)
        self.work = ""
        self.sw: SeaweedFS | None = None
        self.proxy: DelayProxy | None = None
        self.cert: str | None = None
        self.targets: list = []      # the mounts (benchmark.mounts)
        self.raw: list = []          # the raw clients (benchmark.raw_workloads)
        self.results: dict = {}      # column -> row -> list of values
        self.errors: dict = {}       # column -> row -> error text
        self.extras: dict = {}       # column -> row -> list of dicts
        self.log_errors: dict = {}   # column -> list of daemon log error lines
        self.proxy_steps: dict = {}  # (column, step) -> list of DelayProxy.step() dicts
        self.notes: list[str] = []
        self.foreign: ForeignLoad | None = None
        self.vacuum_s = 0.0          # seconds settle() spent compacting
        self.flush_s = 0.0           # ... and flushing and dropping the page cache
        self.vacuum_failed = 0       # compactions SeaweedFS refused or did not finish
        self.failed = False
        self.interrupted = False
        self.fio_label, self.fio_desc = "fio", ""
        self.cold_ok = True
        self._small: dict = {}
        self.huge_data = None        # memory_workloads.HugeData, made when first needed
        self.versions: dict = {}

    # -- setup --------------------------------------------------------------------------------
    def mkdir(self, name: str) -> str:
        p = os.path.join(self.work, name)
        os.makedirs(p, exist_ok=True)
        return p

    def check_disk(self) -> None:
        """Refuses to start a run that would fill the disk. A column's objects are deleted
        after each of its runs (driver.clear_bucket), so one run of every column is what
        SeaweedFS holds at most, besides the source files and the mounts' caches."""
        per_target = self.size + self.mv_size + self.rss_size + (self.n + DIR_FILES) * SMALL
        ntargets = 5 if self.args.compare else 3
        need = (per_target * ntargets * 1.2 + self.size + self.rss_size + self.rss_size * 2
                + 2 * GiB)                                  # + the disk's own slack
        if "huge" in self.steps:
            need += self.huge_size * ntargets * 1.2 + self.huge_size   # + each cache's bound
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise BenchError(f"{free / GiB:.1f} GiB free under {self.work}, the run needs about "
                             f"{need / GiB:.1f} GiB (SeaweedFS data, caches, source files): "
                             "use --workdir on a bigger disk, or a smaller --size-mb")

    def setup(self) -> None:
        self.work = tempfile.mkdtemp(prefix="ssecfs-bench-", dir=self.args.workdir)
        self.foreign = ForeignLoad(self.work)
        progress(f"work dir {self.work}")
        self.check_disk()
        self.make_key()
        # source data (random: SeaweedFS would compress anything else)
        self.src_big = os.path.join(self.work, "src-big.bin")
        self.src_rss = os.path.join(self.work, "src-rss.bin")
        self._gen(self.src_big, self.size)
        if "rss" in self.steps:
            self._gen(self.src_rss, self.rss_size)
        self.big_fd = os.open(self.src_big, os.O_RDONLY)
        self.big_mm = mmap.mmap(self.big_fd, 0, prot=mmap.PROT_READ)
        self.start_seaweed()
        self.route_endpoints()
        self.poller = Poller(self.sw, self.raw_key)
        if "fio" in self.steps:
            self.fio_label, self.fio_desc = tools.setup_fio(self.args, self.versions)
        if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
            self.cold_ok = False
            self.notes.append("not root: could not drop the kernel caches, so 'cold' means "
                              "only remounted with an empty cache")

    def make_key(self) -> None:
        """A raw 32-byte SSE-C key (mode 0600); s3fs wants its base64 form in a file."""
        self.raw_key = os.urandom(32)
        self.keyfile = os.path.join(self.work, "sse.key")
        write_secret(self.keyfile, self.raw_key)
        self.keyfile_b64 = os.path.join(self.work, "sse.key.b64")
        write_secret(self.keyfile_b64, base64.b64encode(self.raw_key) + b"\n")
        self.sse = sse_params(self.raw_key)

    def start_seaweed(self) -> None:
        https = None
        if self.args.tls or self.args.compare:
            self.cert, ck = self_signed_cert(self.work)
            https = (self.cert, ck)
        progress("starting SeaweedFS")
        # no vacuum sweeps of its own: settle() compacts between the steps
        self.sw = SeaweedFS(self.mkdir("seaweed"), https=https,
                            extra_args=[f"-master.vacuumIntervalSeconds={VACUUM_NEVER}"])
        self.sw.start()
        os.environ.update(self.sw.env())
        for v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            os.environ.pop(v, None)
        if self.args.pin:
            tools.pin_cpus(self.sw.proc.pid, self.notes)
        progress(f"SeaweedFS S3 at {self.sw.endpoint}"
                 + (f" and {self.sw.https_endpoint}" if https else ""))
        for b in ("bench-boto3", "bench-awscrt", "bench-ssecfs", "bench-baseline", "bench-s3fs",
                  "bench-rclone"):
            self.sw.create_bucket(b)

    def route_endpoints(self) -> None:
        """The endpoints the tools are given: SeaweedFS's own, or with --rtt the delay
        proxy's in front of them (one port each for http and https)."""
        plain = self.sw.endpoint
        tls = self.sw.https_endpoint if self.cert else None
        if self.args.rtt is not None:
            ups = [("127.0.0.1", self.sw.s3_port)]
            if tls:
                ups.append(("127.0.0.1", self.sw.https_port))
            self.proxy = DelayProxy(self.args.rtt).start(ups)
            plain, tls = self.proxy.url(plain), tls and self.proxy.url(tls)
            progress(f"delay proxy (round trip {self.args.rtt:g} ms): {plain}"
                     + (f" and {tls}" if tls else ""))
        self.endpoint = tls if self.args.tls else plain
        self.https_endpoint = tls

    def _gen(self, path: str, size: int) -> None:
        progress(f"generating {human(size)} of random source data")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n

    # -- for the workloads --------------------------------------------------------------------
    def drop_caches(self) -> None:
        os.sync()
        if self.cold_ok:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            except OSError as e:
                progress(f"WARNING: drop_caches failed: {e}")

    @staticmethod
    def warm(path: str, size: int | None = None) -> None:
        """Read a local file so it is in the page cache (sources of writes and comparisons)."""
        with open(path, "rb", buffering=0) as f:
            left = size if size is not None else os.fstat(f.fileno()).st_size
            while left > 0:
                b = f.read(min(left, 16 * MiB))
                if not b:
                    break
                left -= len(b)

    def timed_write(self, bucket: str, key: str, write, returned: str = "returned_s"):
        """The write step of any column: write() the big file from the warm source, then
        wait until the poller sees it durable. ({row: value}, details)."""
        self.warm(self.src_big)
        t0 = time.monotonic()
        write()
        t1 = time.monotonic()
        t_dur = self.poller.wait_object(bucket, key, self.size, self.timeout_big)
        return ({"write_durable": self.size / MB / (t_dur - t0),
                 "write_close": self.size / MB / (t1 - t0)},
                {returned: t1 - t0, "durable_s": t_dur - t0})

    def small_data(self, run: int) -> list[bytes]:
        return self._blobs(f"small-{run}", self.n)

    def dir_data(self, run: int) -> list[bytes]:
        return self._blobs(f"dir-{run}", DIR_FILES)

    def _blobs(self, seed: str, count: int) -> list[bytes]:
        if seed not in self._small:
            rnd = random.Random(seed)
            self._small[seed] = [rnd.randbytes(SMALL) for _ in range(count)]
        return self._small[seed]

    def small_expect(self, d: str, count: int | None = None) -> dict:
        return {f"{d}/f{i:05d}": SMALL for i in range(self.n if count is None else count)}

    # -- results ------------------------------------------------------------------------------
    def record(self, column: str, values: dict, extra: dict | None = None) -> None:
        for row, v in values.items():
            self.results.setdefault(column, {}).setdefault(row, []).append(v)
            if extra:
                self.extras.setdefault(column, {}).setdefault(row, []).append(extra)

    def record_error(self, column: str, step: str, err: str) -> None:
        self.failed = True
        for row, s in ROW_STEP.items():
            if s == step:
                self.errors.setdefault(column, {}).setdefault(row, err)

    def record_unavailable(self, column: str, steps: list[str], why: str) -> None:
        for s in steps:
            self.record_error(column, s, why)

    # -- teardown -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        for part in [*self.targets, *self.raw]:
            try:
                part.cleanup()
            except Exception as e:  # noqa: BLE001
                progress(f"cleanup of {part.column}: {e}")
        for name, stop in (("the delay proxy", self.proxy and self.proxy.stop),
                           ("SeaweedFS", self.sw and self.sw.stop)):
            if stop:
                progress(f"stopping {name}")
                try:
                    stop()
                except Exception as e:  # noqa: BLE001
                    progress(f"stopping {name}: {e}")
        if getattr(self, "big_mm", None) is not None:
            self.big_mm.close()
        if self.work:
            self.remove_work()

    def remove_work(self) -> None:
        if self.args.keep:
            progress(f"kept {self.work}")
            return
        if self.failed:
            try:
                keep = tempfile.mkdtemp(prefix="ssecfs-bench-logs-", dir=self.args.workdir)
                for t in self.targets:
                    if os.path.exists(t.log):
                        shutil.copy(t.log, os.path.join(keep, f"{t.name}.log"))
                if self.sw is not None and os.path.exists(self.sw.log_path):
                    shutil.copy(self.sw.log_path, os.path.join(keep, "weed.log"))
                progress(f"logs of the failed run kept in {keep}")
            except OSError as e:     # a full disk, say: the work directory goes all the same
                progress(f"logs of the failed run not kept ({e})")
        if any(t.mounted() for t in self.targets):
            progress(f"something is still mounted under {self.work}; not removing it")
            return
        shutil.rmtree(self.work, ignore_errors=True)
