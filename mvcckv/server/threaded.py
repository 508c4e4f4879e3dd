"""The thread-pool gRPC front end (``mvcckv serve --grpc-server threads``).

grpcio's thread server answers a call with much less CPU than grpc.aio: on
this project's 2-core benchmark machine a no-op answered 1.3-1.85x as many
calls on it, and a no-op whose puts wait for a group-committed fdatasync
answered 2x as many puts at 16 clients, where on grpc.aio such puts did not
grow with concurrency at all (``bench/noop_server.py``, ``grpc_load.py``).
So the calls clients make most run here on the server's threads: KV's
Range, Put, DeleteRange and Txn, and Lease's Grant and Revoke
(``threaded_handlers``), read the store and block their thread on a
write's future; the writer's group commit then answers a whole batch of
blocked threads at once.

Every other method keeps its asyncio servicer and runs on the event loop,
bridged by ``Bridge``: a unary call is one hop to the loop and back; a
stream's responses come back through a queue its server thread drains, and
a stream's requests are read by a thread of their own and handed to the
loop.  The servicers see a context with grpc.aio's methods
(``LoopContext``), so they are the same code under either front end.

A call holds a server thread while it runs, a stream for its whole life:
the pool is sized so that it is not the limit (threads are only started
when every started one is busy).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading

import grpc

log = logging.getLogger("mvcckv.server")

# Threads are started on demand, up to this many; each running call or
# open stream holds one, so this bounds concurrent calls plus streams.
MAX_THREADS = 4096

# A stream's responses queued for its thread before the servicer's
# ``write`` waits (grpc.aio's write waits for the transport the same way).
_HIGH_WATER = 64

_END = object()


class Aborted(grpc.aio.AbortError):
    """A servicer aborted its call (``LoopContext.abort``); the server
    thread answers with the status it recorded."""


class LoopContext:
    """grpc.aio's ServicerContext methods the servicers use, over a thread
    server's context, for a servicer coroutine running on the loop."""

    def __init__(self, context: grpc.ServicerContext, loop: asyncio.AbstractEventLoop):
        self._context = context
        self._loop = loop
        self.status: tuple[grpc.StatusCode, str] | None = None
        self._out: queue.SimpleQueue | None = None
        self._queued = 0
        self._room: asyncio.Future | None = None
        self._lock = threading.Lock()

    # -- what the servicers call ---------------------------------------------------

    def invocation_metadata(self):
        return self._context.invocation_metadata()

    def auth_context(self):
        return self._context.auth_context()

    def code(self):
        return self.status[0] if self.status is not None else self._context.code()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        if trailing_metadata:
            self._context.set_trailing_metadata(trailing_metadata)
        self.status = (code, details)
        raise Aborted(details)

    async def write(self, message) -> None:
        """Queue a response for the stream's thread; wait while it is
        ``_HIGH_WATER`` behind, so that a slow client slows its writer."""
        with self._lock:
            self._queued += 1
            full = self._queued >= _HIGH_WATER
            if full:
                room = self._room = self._loop.create_future()
        self._out.put(message)
        if full:
            await room

    # -- the stream's thread ----------------------------------------------------------

    def open_stream(self) -> None:
        self._out = queue.SimpleQueue()

    def responses(self):
        """The queued responses, until the servicer is done (thread side)."""
        while True:
            message = self._out.get()
            if message is _END:
                return
            with self._lock:
                self._queued -= 1
                room = None
                if self._room is not None and self._queued < _HIGH_WATER // 2:
                    room, self._room = self._room, None
            if room is not None:
                self._loop.call_soon_threadsafe(_set_done, room)
            yield message

    def end_stream(self) -> None:
        self._out.put(_END)


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _Requests:
    """A thread server's request iterator as an async iterator on the loop:
    a thread of its own reads it (reading blocks) and hands each request
    to the loop.

    The requests arrive as bytes and are parsed here with ``parse``: one
    that does not parse raises its DecodeError in the servicer's ``async
    for``, which answers it as etcd does (``rpctypes.rpc``), where grpcio's
    thread server would log a traceback and answer "Exception
    deserializing request!".
    """

    def __init__(self, requests, parse, loop: asyncio.AbstractEventLoop):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._thread = threading.Thread(target=self._pump, args=(requests, parse),
                                        name="mvcckv-stream-reader", daemon=True)
        self._thread.start()

    def _pump(self, requests, parse) -> None:
        put = self._queue.put_nowait
        last = _END
        try:
            for raw in requests:
                try:
                    request = parse(raw) if parse is not None else raw
                except Exception as err:  # noqa: BLE001 - handed to the servicer
                    last = _Failed(err)
                    break
                self._loop.call_soon_threadsafe(put, request)
        except Exception:  # noqa: BLE001 - the call ended: treated as the end of its requests
            pass
        try:
            self._loop.call_soon_threadsafe(put, last)
        except RuntimeError:
            pass  # the loop is closed: the server is gone

    def __aiter__(self):
        return self

    async def __anext__(self):
        request = await self._queue.get()
        if request is _END:
            raise StopAsyncIteration
        if type(request) is _Failed:
            raise request.error
        return request


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class Bridge(grpc.GenericRpcHandler):
    """Hands a thread server the handlers of ``dispatcher``: thread
    handlers as they are, asyncio ones run on ``loop``.

    ``wrap``, when given, is applied to each handler before it is bridged
    (the metrics counters, ``GrpcMetrics.wrap``).
    """

    def __init__(self, dispatcher: grpc.GenericRpcHandler, loop: asyncio.AbstractEventLoop, wrap=None):
        self._dispatcher = dispatcher
        self._loop = loop
        self._wrap = wrap
        # (method, handler it was made from) -> the handler given out
        self._made: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details):
        handler = self._dispatcher.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = self._wrap(method, handler) if self._wrap is not None else handler
        bridged = wrapped if not is_async(wrapped) else bridge(wrapped, self._loop)
        # Only the handlers registered once are remembered; a refusal made
        # for one call (bad metadata) is not.
        self._made[method] = (handler, bridged)
        return bridged


def behavior(handler: grpc.RpcMethodHandler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


def is_async(handler: grpc.RpcMethodHandler) -> bool:
    fn = behavior(handler)
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def bridge(handler: grpc.RpcMethodHandler, loop: asyncio.AbstractEventLoop) -> grpc.RpcMethodHandler:
    """A thread handler that runs ``handler``'s coroutine on ``loop``."""
    fn = behavior(handler)
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    generator = inspect.isasyncgenfunction(fn)
    parse = handler.request_deserializer
    # Streamed requests are parsed by _Requests, not by grpcio.
    options = dict(request_deserializer=None if streaming_in else parse,
                   response_serializer=handler.response_serializer)

    def start(request_or_iterator, context: grpc.ServicerContext):
        lctx = LoopContext(context, loop)
        if streaming_out:
            lctx.open_stream()

        async def run():
            arg = _Requests(request_or_iterator, parse, loop) if streaming_in else request_or_iterator
            try:
                if generator:
                    async for message in fn(arg, lctx):
                        await lctx.write(message)
                    return None
                return await fn(arg, lctx)
            finally:
                if streaming_out:
                    lctx.end_stream()

        fut = asyncio.run_coroutine_threadsafe(run(), loop)
        # The client went away or its deadline passed: stop the coroutine.
        context.add_callback(fut.cancel)
        return lctx, fut

    def outcome(context: grpc.ServicerContext, lctx: LoopContext, fut: concurrent.futures.Future):
        try:
            return fut.result()
        except Aborted:
            context.abort(*lctx.status)
        except concurrent.futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "context canceled")

    if not streaming_out:
        def unary_response(request_or_iterator, context):
            lctx, fut = start(request_or_iterator, context)
            return outcome(context, lctx, fut)

        make = grpc.stream_unary_rpc_method_handler if streaming_in else grpc.unary_unary_rpc_method_handler
        return make(unary_response, **options)

    def stream_response(request_or_iterator, context):
        lctx, fut = start(request_or_iterator, context)
        yield from lctx.responses()
        outcome(context, lctx, fut)

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(stream_response, **options)


def new_server(options, bridge_handler: Bridge) -> grpc.Server:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="mvcckv-grpc")
    return grpc.server(pool, handlers=(bridge_handler,), options=options)
