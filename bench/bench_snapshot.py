"""Snapshot save and restore: mvcckv against etcd's own tools, same data, same run.

The data set is etcd's: ``--keys`` keys of ``--value-size`` bytes, then
every 10th key updated and every 100th deleted (history and tombstones),
written once as an etcd snapshot file (``mvcckv.etcdfile``, etcd's buckets
and encodings).  Then, ``--runs`` times each, medians reported:

* restore: ``mvcckv snapshot restore`` (into an LMDB data dir) against
  ``etcdctl snapshot restore`` of the same file; time, MB/s of the snapshot
  file, peak RSS of the restoring process;
* save, embedded: ``Store.snapshot`` to a file in a process that has
  the restored store open (the engine's part of a save, without gRPC);
* save: a server on the restored data, ``mvcckv serve`` with
  ``mvcckv snapshot save --endpoints`` against ``etcd`` with ``etcdctl
  snapshot save``; time, MB/s of the saved file, how far the server's
  resident size rose above where it was before the save, the client's
  peak RSS.

Servers are pinned to core 0 and clients to core 1 (``taskset``).  Run
from the repository root::

    .venv/bin/python bench/bench_snapshot.py --keys 1000000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mvcckv import etcdfile  # noqa: E402
from mvcckv.pb import kv_pb2  # noqa: E402


def build_source(path: Path, keys: int, value_size: int) -> tuple[int, int]:
    """Write the data set as an etcd snapshot; (file size, last revision)."""
    value = b"v" * value_size
    rev = 1

    def entries():
        nonlocal rev
        version = {}
        for i in range(keys):
            rev += 1
            k = b"bench/%08d" % i
            version[i] = 1
            kv = kv_pb2.KeyValue(key=k, create_revision=rev, mod_revision=rev, version=1, value=value)
            yield struct.pack(">Q", rev) + b"_" + bytes(8), kv.SerializeToString()
        for i in range(0, keys, 10):
            rev += 1
            k = b"bench/%08d" % i
            kv = kv_pb2.KeyValue(key=k, create_revision=i + 2, mod_revision=rev, version=2, value=value[::-1])
            yield struct.pack(">Q", rev) + b"_" + bytes(8), kv.SerializeToString()
        for i in range(0, keys, 100):
            rev += 1
            yield struct.pack(">Q", rev) + b"_" + bytes(8) + b"t", kv_pb2.KeyValue(key=b"bench/%08d" % i).SerializeToString()

    source = {b"key": entries(), b"meta": [(b"consistent_index", struct.pack(">Q", 1))]}
    size = etcdfile.save(str(path), source)
    return size, rev


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run by a fresh, small interpreter: a child's peak RSS (ru_maxrss) counts
# the pages it shares with its parent right after fork, so forking from this
# process, which holds the data set's bookkeeping, would inflate it.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)
"""


def run_measured(argv: list[str], core: int, env: dict | None = None) -> tuple[float, int, float]:
    """Run to completion pinned to ``core``; (seconds, peak RSS bytes, CPU seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["taskset", "-c", str(core), sys.executable, "-I", "-S", "-c", _LAUNCHER, *argv],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    code, rss, cpu = proc.stdout.split()
    code, rss = int(code), int(rss)
    if code != 0 or proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {proc.stderr[-2000:]}")
    return elapsed, rss, float(cpu)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler(threading.Thread):
    """The largest resident size of ``pid`` seen while running (every 20 ms):
    the server's own peak during a save, which VmHWM would hide behind the
    peak of its start-up."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = vm_rss(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, vm_rss(self.pid))


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def mvcckv_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def etcdctl_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    env["ETCDCTL_API"] = "3"
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--value-size", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    results: dict[str, list[tuple[float, int, int]]] = {}
    try:
        t0 = time.perf_counter()
        size, last_rev = build_source(work / "source.db", args.keys, args.value_size)
        print(f"data set: {args.keys:,} keys of {args.value_size} B + history, revision {last_rev:,}, "
              f"snapshot {size / 1e6:.1f} MB (written in {time.perf_counter() - t0:.1f} s)", flush=True)

        for run in range(args.runs):
            for name, argv in (
                ("mvcckv restore", [py, "-m", "mvcckv", "snapshot", "restore", str(work / "source.db"),
                                    "--data-dir", str(work / f"m{run}")]),
                ("etcd restore", ["etcdctl", "snapshot", "restore", str(work / "source.db"),
                                  "--data-dir", str(work / f"e{run}")]),
            ):
                env = mvcckv_env() if name.startswith("mvcckv") else etcdctl_env()
                elapsed, rss, cpu = run_measured(argv, 1, env)
                results.setdefault(name, []).append((elapsed, size, rss, 0, cpu))
                print(f"  run {run + 1}: {name}: {elapsed:.2f} s ({cpu:.2f} s CPU), peak RSS {rss / 2**20:.0f} MiB",
                      flush=True)

        # The engine's part of a save, without gRPC: Store.snapshot to a file
        # in a process that has the store open (opening is not timed).
        script = (
            "import sys, time, mvcckv\n"
            "with mvcckv.open(sys.argv[1]) as store:\n"
            "    t0, c0 = time.perf_counter(), time.process_time()\n"
            "    store.snapshot(sys.argv[2])\n"
            "    print(time.perf_counter() - t0, time.process_time() - c0)\n"
        )
        for run in range(args.runs):
            out = work / f"embedded-{run}.db"
            proc = subprocess.run(["taskset", "-c", "0", py, "-c", script, str(work / "m0"), str(out)],
                                  env=mvcckv_env(), capture_output=True, text=True, check=True)
            elapsed, cpu = map(float, proc.stdout.split())
            print(f"  run {run + 1}: Store.snapshot (embedded, no gRPC): {elapsed:.2f} s ({cpu:.2f} s CPU), "
                  f"{out.stat().st_size / elapsed / 1e6:.0f} MB/s", flush=True)
            results.setdefault("embedded", []).append((elapsed, cpu))
            out.unlink()

        for name in ("etcd", "mvcckv"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if name == "etcd":
                peer = free_port()
                argv = ["etcd", "--data-dir", str(work / "e0"), "--listen-client-urls", url,
                        "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}"]
                env = etcdctl_env()
            else:
                argv = [py, "-m", "mvcckv", "serve", "--data-dir", str(work / "m0"),
                        "--listen-client-urls", url, "--advertise-client-urls", url]
                env = mvcckv_env()
            t0 = time.perf_counter()
            server = subprocess.Popen(["taskset", "-c", "0", *argv], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(port, server, 600)
                print(f"{name} serving the restored data after {time.perf_counter() - t0:.1f} s", flush=True)
                for run in range(args.runs):
                    out = work / f"saved-{name}-{run}.db"
                    before = vm_rss(server.pid)
                    sampler = RssSampler(server.pid)
                    sampler.start()
                    server_cpu = cpu_seconds(server.pid)
                    if name == "etcd":
                        client = ["etcdctl", f"--endpoints={url}", "snapshot", "save", str(out)]
                    else:
                        client = [py, "-m", "mvcckv", "snapshot", "save", "--endpoints", url, str(out)]
                    try:
                        elapsed, rss, cpu = run_measured(client, 1, env)
                    finally:
                        sampler.done.set()
                        sampler.join()
                    grown = sampler.peak - before
                    cpu += cpu_seconds(server.pid) - server_cpu
                    saved = out.stat().st_size
                    results.setdefault(f"{name} save", []).append((elapsed, saved, rss, grown, cpu))
                    print(f"  run {run + 1}: {name} save: {elapsed:.2f} s ({cpu:.2f} s CPU, client + server), "
                          f"{saved / 1e6:.1f} MB, client peak RSS "
                          f"{rss / 2**20:.0f} MiB, server RSS rose {grown / 2**20:.0f} MiB", flush=True)
                    out.unlink()
            finally:
                server.terminate()
                server.wait(60)

        print()
        print("| direction | tool | time s | MB/s | CPU s | peak RSS MiB | server RSS rise MiB "
              "| mvcckv / etcd, time | mvcckv / etcd, CPU |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for direction in ("restore", "save"):
            med = {}
            for tool in ("mvcckv", "etcd"):
                rows = results[f"{tool} {direction}"]
                t = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[4] for r in rows)
                med[tool] = (t, cpu)
                mb = statistics.median(r[1] for r in rows) / 1e6
                rss = statistics.median(r[2] for r in rows) / 2**20
                grown = f"{statistics.median(r[3] for r in rows) / 2**20:.0f}" if direction == "save" else "-"
                ratios = (f"{med['mvcckv'][0] / t:.2f} | {med['mvcckv'][1] / cpu:.2f}" if tool == "etcd"
                          else " | ")
                print(f"| {direction} | {tool} | {t:.2f} | {mb / t:.0f} | {cpu:.2f} | {rss:.0f} | {grown} "
                      f"| {ratios} |")
        t = statistics.median(r[0] for r in results["embedded"])
        cpu = statistics.median(r[1] for r in results["embedded"])
        etcd_t, etcd_cpu = med["etcd"]
        print(f"| save | mvcckv Store.snapshot (embedded, no gRPC) | {t:.2f} | {size / 1e6 / t:.0f} | {cpu:.2f} "
              f"| - | - | {t / etcd_t:.2f} | {cpu / etcd_cpu:.2f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
