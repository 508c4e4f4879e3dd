"""A gRPC server that answers etcd's KV.Range and KV.Put without doing anything.

It measures the ceiling of a Python gRPC process on this machine: requests
arrive as raw bytes (identity deserializer), and every answer is a
precomputed, valid ``RangeResponse`` / ``PutResponse`` encoding (identity
serializer).  No storage, no protobuf objects, no per-request encoding.

A single-key Range is answered with one key-value of the benchmark's value
size; a Range that carries a ``range_end`` is answered with 100 key-values,
so the bytes on the wire match what a real store sends for the ``range100``
workload.  Put is answered with a header only.

Three server flavours, because which one is faster is the question:

* ``--mode aio``     grpc.aio server, ``async def`` handlers (default)
* ``--mode threads`` classic grpcio server with a thread pool
* ``--mode durable`` the aio server, but a Put is answered only once its
  request bytes are on disk: appended to a log file by one syncer thread
  that writes and ``fdatasync``-s everything queued since its last sync
  (group commit), then resolves the whole batch's futures with a single
  wake-up of the event loop.  The ceiling of a durable Python server.

and two ways to register the handlers:

The aio and durable modes run on the standard library's event loop, or on
uvloop's with ``--loop uvloop`` (what ``mvcckv serve`` runs on by default).

* ``--handlers generic``     ``method_handlers_generic_handler`` (default)
* ``--handlers registered``  ``add_registered_method_handlers``, the path
  used by code generated with grpcio-tools >= 1.63

Always binds 127.0.0.1.  Stops cleanly on SIGTERM/SIGINT.

    python bench/noop_server.py --port 23790 --mode threads --workers 16
    python bench/noop_server.py --port 23790 --mode durable --log-dir /tmp/noop-log
    python bench/noop_server.py --port 23790 --mode aio --loop uvloop
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

import grpc_load as gl  # noqa: E402

SERVICE = "etcdserverpb.KV"


def precomputed_responses(value_size: int = gl.VALUE_SIZE) -> dict[str, bytes]:
    """The canned answers: ``put``, ``range1`` and ``range100``."""
    header = gl.response_header(cluster_id=0x1C0FFEE, member_id=0xBE7C4, revision=1000, raft_term=2)
    value = gl.make_value(value_size)
    one = gl.key_value(gl.GET_KEY, create_revision=2, mod_revision=2, version=1, value=value)
    many = [
        gl.key_value(k, create_revision=10 + i, mod_revision=10 + i, version=1, value=value)
        for i, k in enumerate(gl.range_keys())
    ]
    return {
        "put": gl.put_response(header),
        "range1": gl.range_response(header, [one], count=1),
        "range100": gl.range_response(header, many, count=len(many)),
    }


def has_range_end(request: bytes) -> bool:
    """True when a RangeRequest's bytes carry field 2 (range_end).

    Cheap: the encoders (ours and protobuf's) write fields in number order,
    so field 2 directly follows field 1 when present.
    """
    if not request or request[0] != 0x0A:  # field 1, length-delimited
        return bool(request) and request[0] == 0x12
    length, pos = gl.decode_varint(request, 1)
    pos += length
    return pos < len(request) and request[pos] == 0x12


class GroupLog:
    """Durable puts: one syncer thread, one write + fdatasync per batch.

    ``append`` (on the event loop) queues a record and returns an asyncio
    future; the syncer takes everything queued, writes it, fdatasyncs, and
    resolves every future of the batch in one ``call_soon_threadsafe``.
    Records are framed as a 4-byte length before the request bytes, so the
    file is readable back (nothing reads it: it exists to be fsynced).
    """

    _LEN = struct.Struct("<I")

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._records: list[bytes] = []
        self._futures: list = []
        self._closed = False
        self._loop = None
        self._thread = threading.Thread(target=self._run, name="noop-syncer", daemon=True)

    def start(self, loop) -> None:
        self._loop = loop
        self._thread.start()

    def append(self, record: bytes):
        fut = self._loop.create_future()
        with self._lock:
            self._records.append(self._LEN.pack(len(record)))
            self._records.append(record)
            self._futures.append(fut)
            if len(self._futures) == 1:
                self._wake.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._futures and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                records, self._records = self._records, []
                futures, self._futures = self._futures, []
            os.write(self._fd, b"".join(records))
            os.fdatasync(self._fd)
            self._loop.call_soon_threadsafe(_resolve_all, futures)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        os.close(self._fd)


def _resolve_all(futures) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def _method_handlers(responses: dict[str, bytes], asynchronous: bool, log: GroupLog | None = None) -> dict:
    put_resp = responses["put"]
    range1 = responses["range1"]
    range100 = responses["range100"]

    if log is not None:
        async def put(request, context):
            await log.append(request)
            return put_resp

        async def range_(request, context):
            return range100 if has_range_end(request) else range1
    elif asynchronous:
        async def put(request, context):
            return put_resp

        async def range_(request, context):
            return range100 if has_range_end(request) else range1
    else:
        def put(request, context):
            return put_resp

        def range_(request, context):
            return range100 if has_range_end(request) else range1

    return {
        "Put": grpc.unary_unary_rpc_method_handler(put),
        "Range": grpc.unary_unary_rpc_method_handler(range_),
    }


def _register(server, handlers: dict, how: str) -> None:
    if how == "registered":
        server.add_registered_method_handlers(SERVICE, handlers)
    else:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def serve_threads(port: int, workers: int, how: str, responses: dict[str, bytes]) -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    _register(server, _method_handlers(responses, asynchronous=False), how)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"noop_server listening on 127.0.0.1:{bound} (threads, {workers} workers, {how})", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=None).wait(5)


def serve_aio(port: int, how: str, responses: dict[str, bytes], log_dir: str | None = None,
              loop_name: str = "asyncio") -> None:
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        log = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            log = GroupLog(os.path.join(log_dir, "puts.log"))
            log.start(loop)
        server = grpc.aio.server()
        _register(server, _method_handlers(responses, asynchronous=True, log=log), how)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        mode = "aio" if log is None else f"durable, log in {log_dir}"
        print(f"noop_server listening on 127.0.0.1:{bound} ({mode}, {how}, {loop_name} loop)", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=None)
        if log is not None:
            log.close()

    if loop_name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=23790, help="TCP port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--mode", choices=("aio", "threads", "durable"), default="aio")
    p.add_argument("--workers", type=int, default=16, help="thread-pool size for --mode threads")
    p.add_argument("--handlers", choices=("generic", "registered"), default="generic")
    p.add_argument("--value-size", type=int, default=gl.VALUE_SIZE, help="value bytes in the canned Range answers")
    p.add_argument("--log-dir", help="--mode durable: directory of the put log (created; required)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop of --mode aio and durable (mvcckv serve's --event-loop)")
    args = p.parse_args(argv)
    if args.mode == "durable" and not args.log_dir:
        p.error("--mode durable needs --log-dir")

    responses = precomputed_responses(args.value_size)
    if args.mode == "threads":
        serve_threads(args.port, args.workers, args.handlers, responses)
    else:
        serve_aio(args.port, args.handlers, responses, args.log_dir if args.mode == "durable" else None,
                  args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
