#!/usr/bin/env python3
"""What the per-RPC gRPC metrics cost ``mvcckv serve``: h2load-driven, built
on grpc_load.py and bench_auth.py's server handling.

One invocation starts, on free loopback ports with fresh data dirs:

``mvcckv``            as shipped with ``--listen-metrics-urls``: the metrics
                      interceptor (``mvcckv.server.metrics.GrpcMetrics``)
                      counts every call (a server without HTTP listeners does
                      not count, and pays nothing)
``mvcckv-nometrics``  the same server without that interceptor (this script
                      re-enters itself with ``--serve-without-grpc-metrics``,
                      which builds the server with no metrics interceptor)

and ``--compare control`` adds ``mvcckv#2``, a second shipped server: how
far apart two identical servers land in the same run (the noise floor).
Runs are interleaved across servers (grpc_load's ``benchmark``), the
server pinned to one core and h2load to the other; figures are medians.
The ratio reads "fraction of the uninstrumented server's QPS kept": 1.00
is free.

The engine's own counters (``mvcckv.stats``: a few integer increments per
request, two clock reads per write batch) are in both servers; only the
interceptor differs.

Example::

    .venv/bin/python bench/bench_metrics.py --runs 5 --duration 5 --retry-noisy 15
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

import bench_auth as ba  # noqa: E402
import grpc_load as gl  # noqa: E402

DEFAULT_WORKLOADS = ("get-serializable", "put")
DEFAULT_LEVELS = (1, 16, 64)
SERVE_WITHOUT = "--serve-without-grpc-metrics"


def serve_without_grpc_metrics(serve_args: list[str]) -> int:
    """``mvcckv serve`` with every gRPC call left uncounted."""
    from mvcckv.server import app, config

    shipped = app.build_server
    app.build_server = lambda node, cfg, metrics=None: shipped(node, cfg)
    parser = argparse.ArgumentParser(prog="mvcckv")
    config.add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *serve_args])
    return args.func(args)


def micro(calls: int, repeats: int) -> str:
    """CPU time the interceptor adds to one unary call, measured in-process:
    the same handler lookup and call, through ``GrpcMetrics`` and without
    it, with a servicer that answers a prebuilt Range response at once (so
    the difference is all interceptor).  Medians over ``repeats``."""
    import asyncio
    import statistics

    import grpc

    from mvcckv.pb import rpc_pb2 as pb
    from mvcckv.server.metrics import GrpcMetrics

    answer = pb.RangeResponse(count=1)
    answer.header.revision = 2
    answer.kvs.add(key=b"bench/get", value=b"v" * 256, create_revision=2, mod_revision=2, version=1)
    raw = pb.RangeRequest(key=b"bench/get", serializable=True).SerializeToString()

    async def behavior(request, context):
        return answer

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    class Details:
        method = "/etcdserverpb.KV/Range"
        invocation_metadata = ()

    class Context:
        def code(self):
            return None

    async def continuation(details):
        return handler

    async def plain(n):
        ctx, details = Context(), Details()
        for _ in range(n):
            await (await continuation(details)).unary_unary(raw, ctx)

    async def counted(n, interceptor):
        ctx, details = Context(), Details()
        for _ in range(n):
            await (await interceptor.intercept_service(continuation, details)).unary_unary(raw, ctx)

    def cpu_us(run) -> float:
        start = time.process_time()
        asyncio.run(run)
        return (time.process_time() - start) / calls * 1e6

    without, with_ = [], []
    for _ in range(repeats):
        without.append(cpu_us(plain(calls)))
        interceptor = GrpcMetrics()
        with_.append(cpu_us(counted(calls, interceptor)))
        assert interceptor.handled[("/etcdserverpb.KV/Range", "OK")] == calls
    a, b = statistics.median(without), statistics.median(with_)
    return "\n".join([
        "## gRPC metrics interceptor, in-process (CPU microseconds per unary call)", "",
        f"    {shlex.quote(sys.executable)} bench/bench_metrics.py --micro --calls {calls} --repeats {repeats}", "",
        "| path | CPU µs per call (median) |", "|---|---|",
        f"| handler lookup + call, no interceptor | {a:.2f} |",
        f"| the same through GrpcMetrics | {b:.2f} |",
        f"| added by the interceptor | {b - a:.2f} |", "",
    ])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Cost of mvcckv's gRPC metrics interceptor (h2load)")
    p.add_argument("--micro", action="store_true",
                   help="only the in-process measurement of the CPU the interceptor adds per call")
    p.add_argument("--calls", type=int, default=200_000, help="calls per --micro repeat")
    p.add_argument("--repeats", type=int, default=5, help="--micro repeats (median)")
    p.add_argument("--workload", default=",".join(DEFAULT_WORKLOADS),
                   type=lambda s: gl._parse_list(s, gl.WORKLOAD_NAMES))
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_LEVELS)), type=ba._parse_levels)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="runs per row; medians (default 3)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--retry-noisy", type=float, metavar="PCT")
    p.add_argument("--compare", default="", help="'control' adds a second shipped server (noise floor)")
    p.add_argument("--h2load", default=shutil.which("h2load") or "h2load")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--tmp-dir")
    p.add_argument("--markdown", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.micro:
        print(micro(args.calls, args.repeats))
        return 0
    if not shutil.which(args.h2load):
        p.error(f"h2load not found ({args.h2load}); install the nghttp2-client package")

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _interrupt)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    server_cpus, load_cpus = (None, None) if args.no_pin else gl.plan_cpus()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    python = shlex.quote(sys.executable)
    commands = {
        "mvcckv": [sys.executable, "-m", "mvcckv", "serve"],
        "mvcckv-nometrics": [sys.executable, os.path.abspath(__file__), SERVE_WITHOUT],
    }
    if "control" in args.compare:
        commands["mvcckv#2"] = commands["mvcckv"]
    started_at = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-metrics-", dir=args.tmp_dir))
        endpoints = []
        for name, command in commands.items():
            port = gl.free_port()
            url = f"http://127.0.0.1:{port}"

            # Every server serves /metrics (gRPC calls are counted only
            # then); the listener stays idle during the load.
            metrics_url = f"http://127.0.0.1:{gl.free_port()}"

            def argv_for(datadir: str, command=command, url=url, metrics_url=metrics_url) -> list[str]:
                return [*command, "--name", "bench", "--data-dir", datadir,
                        "--listen-client-urls", url, "--advertise-client-urls", url,
                        "--listen-metrics-urls", metrics_url]
            srv = stack.enter_context(ba.started(name, argv_for, url, server_cpus, args.tmp_dir))
            log(f"# started {name} on {url} (pid {srv.pid})")
            endpoints.append(gl.Endpoint(name, url, srv.pid, ()))
        results = gl.benchmark(endpoints, args.workload, args.concurrency, connections=args.connections,
                               duration=args.duration, requests=None, runs=args.runs, warmup=args.warmup,
                               workdir=workdir, h2load=args.h2load, server_cpus=server_cpus,
                               retry_noisy=args.retry_noisy, log=log)
    comps = [("with / without the metrics interceptor", "mvcckv", "mvcckv-nometrics")]
    if "mvcckv#2" in commands:
        comps.append(("A/A: 2nd shipped server / shipped", "mvcckv#2", "mvcckv"))
    report = "\n".join([
        "## gRPC metrics overhead", "",
        f"Command (from {os.getcwd()}, {time.monotonic() - started_at:.0f} s):", "",
        f"    {python} bench/bench_metrics.py {shlex.join(argv)}", "",
        f"Machine: {ba.machine_note(args.h2load, None)}.", "",
        f"{args.duration:g} s x {args.runs} runs per row after {args.warmup:g} s of warm-up, medians; "
        "runs interleaved across servers.", "",
        "### Figures", "",
        ba.format_figures(results, list(commands)), "",
        "### Ratios (1.00 = no overhead)", "",
        ba.format_ratios(results, comps), "",
    ])
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == SERVE_WITHOUT:
        sys.exit(serve_without_grpc_metrics(sys.argv[2:]))
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
