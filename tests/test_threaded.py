"""The thread server's bridge to asyncio servicers (mvcckv/server/threaded.py).

A real grpcio thread server on a free loopback port, with a few asyncio
handlers of every call shape, run on an event loop in another thread, as
``mvcckv serve --grpc-server threads`` runs its servicers.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from harness import free_port
from mvcckv.server import threaded

SERVICE = "test.Bridge"


def _identity(b: bytes) -> bytes:
    return b


class Loop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Handlers(grpc.GenericRpcHandler):
    """asyncio handlers, and one thread handler, of every call shape."""

    def __init__(self):
        self.max_queued = 0
        self.finished: list[str] = []
        self.cancelled = threading.Event()
        self.contexts: list = []

    def service(self, details):
        name = details.method.rpartition("/")[2]
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Write": grpc.unary_stream_rpc_method_handler(self.write),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
            "Hang": grpc.unary_stream_rpc_method_handler(self.hang),
            "Thread": grpc.unary_unary_rpc_method_handler(self.on_thread),
        }.get(name)

    async def echo(self, request, context):
        metadata = dict(context.invocation_metadata())
        return request + metadata.get("suffix", "").encode()

    async def fail(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: " + request.decode())

    async def count(self, request, context):
        for i in range(int(request)):
            yield str(i).encode()
        if request == b"3":
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "three is enough")

    async def write(self, request, context):
        self.contexts.append(context)
        n, size = map(int, request.split(b","))
        for i in range(n):
            await context.write(b"%d," % i + b"x" * size)
            self.max_queued = max(self.max_queued, context._queued)
        self.finished.append("write")

    async def chat(self, requests, context):
        async for request in requests:
            await context.write(b"re: " + request)
        await context.write(b"bye")

    async def sum(self, requests, context):
        total = 0
        async for request in requests:
            total += int(request)
        return str(total).encode()

    async def hang(self, request, context):
        try:
            yield b"started"
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def on_thread(self, request, context):
        assert threading.current_thread() is not threading.main_thread()
        return b"thread:" + request


@pytest.fixture
def served():
    loop = Loop()
    handlers = Handlers()
    bridge = threaded.Bridge(handlers, loop.loop)
    server = threaded.new_server([], bridge)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, handlers
    finally:
        channel.close()
        server.stop(None).wait(5)
        loop.close()


def _call(channel, kind, name):
    make = getattr(channel, kind)
    return make(f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity)


def test_unary_call_runs_on_the_loop_and_sees_metadata(served):
    channel, _ = served
    assert _call(channel, "unary_unary", "Echo")(b"hi", metadata=(("suffix", "!"),), timeout=10) == b"hi!"


def test_abort_gives_the_status_the_servicer_chose(served):
    channel, _ = served
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, "unary_unary", "Fail")(b"no leader", timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "etcdserver: no leader"


def test_generator_stream_and_abort_after_messages(served):
    channel, _ = served
    assert list(_call(channel, "unary_stream", "Count")(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for message in _call(channel, "unary_stream", "Count")(b"3", timeout=10):
            got.append(message)
    assert got == [b"0", b"1", b"2"]
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and err.value.details() == "three is enough"


def test_bidirectional_stream_keeps_order(served):
    channel, _ = served
    answers = list(_call(channel, "stream_stream", "Chat")(iter([b"a", b"b", b"c"]), timeout=10))
    assert answers == [b"re: a", b"re: b", b"re: c", b"bye"]


def test_client_streaming(served):
    channel, _ = served
    assert _call(channel, "stream_unary", "Sum")(iter([b"1", b"2", b"39"]), timeout=10) == b"42"


def test_writes_wait_for_a_slow_reader(served):
    """A servicer writing faster than its client reads is held at the
    queue's high-water mark instead of queueing everything: once the
    transport's flow-control window is full, the server thread's send
    blocks, the queue fills, and the servicer's write waits."""
    channel, handlers = served
    n, size = 4 * threaded._HIGH_WATER, 256 * 1024  # 64 MiB, well over any window
    stream = _call(channel, "unary_stream", "Write")(b"%d,%d" % (n, size), timeout=60)
    first = next(stream)
    time.sleep(1.0)  # the servicer runs ahead until its writes wait
    assert "write" not in handlers.finished
    assert handlers.contexts[0]._queued <= threaded._HIGH_WATER
    rest = list(stream)
    assert [m.partition(b",")[0] for m in [first] + rest] == [b"%d" % i for i in range(n)]
    assert all(len(m.partition(b",")[2]) == size for m in rest)
    assert handlers.max_queued <= threaded._HIGH_WATER and handlers.finished == ["write"]


def test_cancelled_call_cancels_the_coroutine(served):
    channel, handlers = served
    stream = _call(channel, "unary_stream", "Hang")(b"", timeout=30)
    assert next(stream) == b"started"
    stream.cancel()
    assert handlers.cancelled.wait(10)


def test_thread_handlers_are_not_bridged(served):
    channel, _ = served
    assert _call(channel, "unary_unary", "Thread")(b"x", timeout=10) == b"thread:x"


def test_unknown_method_is_unimplemented(served):
    channel, _ = served
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, "unary_unary", "Nope")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
