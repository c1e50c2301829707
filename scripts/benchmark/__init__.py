"""Benchmark of ssecfs: not a test, it prints figures. `scripts/bench` runs it.

Starts a throw-away SeaweedFS (scripts/seaweed.py) in a temporary directory, makes a raw 32-byte
SSE-C key (mode 0600), mounts ssecfs with its default options

    ssecfs mount bench-ssecfs MNT --keyfile K --endpoint-url EP --cache-dir D [--ssecfs-args]

and runs the workloads below against it and against two raw S3 clients (same key, same data):
boto3, and the AWS Common Runtime's S3 client (awscrt), the fastest client there is and so the
ceiling; with --compare also against s3fs-fuse and rclone mount on the same SeaweedFS. With
--rtt MS every tool's endpoint is behind a proxy that delays each direction by MS/2. Prints
progress to stderr and a markdown table to stdout; unmounts everything and stops SeaweedFS
(and the proxy) at the end, also on failure or Ctrl-C.

    scripts/bench                                   # full size (1 GiB files, 1,000 small files)
    scripts/bench --size-mb 64 --small-files 100    # a quick run
    scripts/bench --compare --json results.json     # + s3fs-fuse and rclone columns
    scripts/bench --only write,fio --runs 3         # some workloads, median of 3 runs
    scripts/bench --compare --rtt 20                # every endpoint 20 ms of round trip away
    scripts/bench --rtt 0                           # through the proxy, no delay (its cost)

Workloads (BIG = --size-mb MiB, N = --small-files; MB = 10^6 bytes). The raw clients do the
same requests (benchmark/raw_workloads.py): boto3 with a TransferConfig of 8 MiB parts on 10
threads, awscrt with 8 MiB parts on 10 connections (benchmark/raw_awscrt.py says how each
workload is done there).
  write        write BIG sequentially (1 MiB write() calls, data from a local random file that is
               in the page cache), no fsync. "until close() returns": open..close. "until durable":
               open..the moment an independent boto3 poller (HEAD with the SSE-C key, every 50 ms)
               first sees the complete object (ContentLength = BIG, key MD5 echoed) whose ETag then
               stays the same for 1 s. Raw clients: a multipart upload from the file with SSE-C;
               "close" = the upload returns.
  read_cold    read BIG sequentially (1 MiB reads) after: unmount, cache dir cleared, sync +
               echo 3 > /proc/sys/vm/drop_caches, remount. Every byte is compared with the source.
               Raw clients: drop_caches, parallel 8 MiB ranged GETs into a verifying sink.
  small_create mkdir + create N files of 4 KiB (sequential open/write/close) until all are durable
               (a ListObjectsV2 poller sees all N keys at 4096 bytes, ETags stable 1 s; then each
               is HEADed with the key, untimed, to check it is SSE-C). Raw: sequential PUTs.
  ls_cold      `ls -l DIR` of those N files after a cold remount (as read_cold). Raw:
               ListObjectsV2 of the prefix (sizes and mtimes come with the listing).
  small_read   read those N files (sequential open/read/close, content checked) after a cold
               remount. Raw: drop_caches, sequential GETs.
  small_delete `rm -r` of that directory of N files until no key is left under it (a
               ListObjectsV2 poller). Raw: list, DeleteObjects (1,000 keys a request).
  mv_file      `mv` a BIG/4 file (written through the mount earlier, durable, fresh mount with an
               empty cache) until durable: the new key has the full size (HEAD with the key) and
               the old key is gone. Raw: CopyObject (SSE-C source and destination) +
               DeleteObject.
  mv_dir       `mv` a directory of 100 x 4 KiB files (same preparation) until durable: all 100 keys
               under the new prefix at full size and no key left under the old one. Raw: list,
               CopyObject, 10 at a time, DeleteObjects.
  fio          4 KiB random reads, queue depth 1 (psync), O_DIRECT (so the kernel page cache is
               not what is measured), --fio-runtime seconds, on the BIG file after it was read
               once through the mount (so it is in the filesystem's own cache). fio if installed
               (apt-get install -y fio when root), else a Python pread loop; the row says which.
  rss          peak RSS (VmHWM in /proc/PID/status) of the daemon (ssecfs: pid from the mount
               registry; s3fs/rclone: their process), freshly mounted, after `cp` of a 2*BIG
               file into the mount has become durable.

Memory workloads (only with --memory, or named in --only; no raw client column):
  big_dir      a directory of --big-dir files (100,000; 16 bytes each) PUT directly with boto3
               (SSE-C, 32 threads, untimed, once per bucket), as another tool would leave them;
               after a cold remount, `ls -l` of it (timed, every entry counted), then the same
               `ls -l` again; peak RSS of the freshly mounted daemon over both.
  huge         a --huge-gb file (10 GiB) written through the mount with 1 MiB writes until
               durable (peak RSS of a freshly mounted daemon), then read back after a cold
               remount, every byte compared (peak RSS of that daemon). The data comes from a
               64 MiB random pool, so no source file of that size is needed.

The ratio column is ssecfs / raw boto3 where boto3 has a figure, else (with --compare)
ssecfs / the better of s3fs-fuse and rclone; "÷ awscrt" is ssecfs / raw awscrt. For rows in s
and MiB lower is better, so a ratio above 1 means ssecfs is slower / bigger there. The last
column is the issue's target made relative to this run: a target stated against raw boto3
stays that ratio; an absolute one becomes a ratio to the better of s3fs-fuse and rclone in the
issue's own table (create >= 500 files/s next to rclone's 364 is 1.37x rclone) times their
figure in this run, so it needs --compare; peak RSS stays absolute. With --rtt the targets are
those of issue "Fast at a distance" (absolute, and create >= 1.5x the better peer).

--rtt MS: the delay proxy (benchmark/delayproxy.py, its own process) listens on loopback in
front of SeaweedFS's http port (and https port, for rclone or --tls) and forwards bytes, so TLS
passes through untouched. Each direction is a delay line: a chunk read at t is written on at
t + MS/2, so latency is added without capping bandwidth; a new connection's first bytes wait
one more round trip, as a TCP handshake would. The durability poller talks to SeaweedFS
directly. The proxy's CPU time, bytes and lateness are reported per step, so that it can be
seen not to be the limit; --rtt 0 goes through it without delay, to compare with a run
without it.

SeaweedFS compacts deleted data (its "vacuum") before each step, outside the timed part; its
own periodic sweep, which takes seconds of CPU whenever it falls (every 14 minutes by default),
is switched off, so it cannot slow down whichever column happens to be running then. Also
before each step, untimed: sync, and (as root) the page cache is dropped, so that no step
pays for the dirty data or the page cache an earlier step left (on a VM that hands freed
memory back to its host, new page cache gets much dearer once recently freed memory is used
up).

The machine should be otherwise idle. While each step runs, the CPU time of every other
process (not this one or its children, not one whose command line names the work directory,
not a kernel thread) is counted; above 0.1 CPU, a WARNING line names the busiest one and goes
under the table: that figure is not clean.

s3fs-fuse runs with default options plus -o use_sse=custom:KEYFILE (base64 key),
url=EP,use_path_request_style,passwd_file=F. rclone runs `rclone mount` with an s3 remote
(provider Other) from RCLONE_CONFIG_* variables, --vfs-cache-mode full, SSE-C AES256 with the
base64 key; rclone (AWS SDK for Go) refuses to send SSE-C keys over plain http, so it always
talks https to SeaweedFS (a self-signed certificate made here); --tls makes everything use https.
"""
