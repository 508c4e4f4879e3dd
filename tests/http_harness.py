"""HTTP helpers for the gateway tests: an ``mvcckv serve`` with HTTP
listeners, and a small client that keeps every detail of an answer.

    with HttpMvcckv(tmp_path / "data") as server:
        answer = post(server.http_url, "/v3/kv/range", {"key": b64("foo")})
        assert answer.status == 200 and answer.json["header"]["revision"] == "1"

Real etcd 3.4 serves the same JSON on its client URL, so ``post`` takes
``etcd.client_url`` just as well.  Streams are read with :func:`stream`,
which returns the chunks of a chunked answer one by one.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

from harness import MvcckvProcess, free_port

TIMEOUT = 10.0


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class HttpMvcckv(MvcckvProcess):
    """``mvcckv serve`` with ``--listen-client-http-urls`` (``http_url``)
    and ``--listen-metrics-urls`` (``metrics_url``) on ports of their own."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.http_port = 0
        self.metrics_port = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _pick_ports(self) -> None:
        super()._pick_ports()
        taken = {self.port}
        for name in ("http_port", "metrics_port"):
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            setattr(self, name, port)

    def _command(self) -> list[str]:
        return super()._command() + [
            "--listen-client-http-urls", self.http_url,
            "--listen-metrics-urls", self.metrics_url,
        ]

    def _launch(self) -> None:
        super()._launch()
        # gRPC answers first; the HTTP listeners start right after, each
        # on its own, so both are waited for.
        deadline = time.monotonic() + TIMEOUT
        for name, port in (("HTTP", self.http_port), ("metrics", self.metrics_port)):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self._fail(f"{name} listener not up")
                    time.sleep(0.02)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def request(base: str, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict[str, str] | None = None) -> Answer:
    """One HTTP request; the answer whatever its status."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def post(base: str, path: str, body: bytes | str | dict | None = None, token: str | None = None) -> Answer:
    return request(base, "POST", path, body if body is not None else b"",
                   {"Authorization": token} if token else None)


def stream(base: str, path: str, body: bytes | str | dict, *, max_chunks: int,
           timeout: float = 3.0, token: str | None = None) -> Iterator[bytes]:
    """The chunks of a chunked answer, read off the socket as they come
    (raw, so that a message split across chunks would show), until
    ``max_chunks`` or the end of the answer or ``timeout`` without data."""
    parts = urllib.parse.urlsplit(base)
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        auth = b"Authorization: " + token.encode() + b"\r\n" if token else b""
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + parts.netloc.encode()
                     + b"\r\n" + auth + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reader = sock.makefile("rb")
        status = reader.readline()
        assert b" 200 " in status, status
        chunked = False
        while True:
            line = reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        assert chunked, "a stream must be chunked"
        for _ in range(max_chunks):
            try:
                size_line = reader.readline()
            except (socket.timeout, TimeoutError):
                return
            if not size_line:
                return
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return
            chunk = reader.read(size)
            reader.readline()
            yield chunk
    finally:
        sock.close()
