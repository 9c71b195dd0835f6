"""HTTP client side shared by every server engine: ONE stream reader.

Every request is rendered once into a ``WireRequest`` (request line, headers
and JSON body as bytes, serialized BEFORE any clock starts); the harness
client here and the stdlib reference client (``reference.py``, the timing
control) send exactly those bytes.

``HttpClient.exchange`` is the one reader: a raw HTTP/1.1 exchange over
asyncio streams on a fresh connection (llama-server closes the connection
after a streamed response, so pooled keep-alive connections break). The
connection is opened OUTSIDE the timed region; every time is measured from
the moment the connection is established:

* ``send_s``        the request bytes handed to the socket;
* ``first_byte_s``  the response's status line arrived;
* ``ttft_s``        the arrival of the read that completed the first event
                    carrying content (chat ``delta.content``, completion
                    ``text``, llama.cpp ``content``);
* ``total_s``       the body complete.

Server-sent events are split and decoded once; every non-content field
that events carry (``usage``, llama.cpp's ``timings``, ...) is kept (last
value) in ``StreamResult.fields`` for the adapter to interpret. A
non-streamed response gives its JSON body as ``fields``.

Why not aiohttp: a ClientSession + connector + trace config per request
cost ~1-3 ms per request on a 2-core CPU (measured by the calibration
control), the size of a GPU cache hit. The raw exchange has no per-request
objects beyond the two streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class StreamResult:
    ttft_s: float | None
    total_s: float
    connect_s: float
    text: str
    chunks: int
    fields: dict = field(default_factory=dict)  # last value of each non-choices field seen (or the JSON body)
    finish_reason: str | None = None
    send_s: float | None = None
    first_byte_s: float | None = None
    status: int = 200
    body: str | None = None  # a non-streamed response's body


@dataclass(frozen=True)
class WireRequest:
    """One HTTP request as bytes: what both the harness and the reference client send."""

    host: str
    port: int
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool
    data: bytes = b""  # request line + headers + body, rendered once (outside every timed region)

    def __post_init__(self):
        head = f"{self.method} {self.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        object.__setattr__(self, "data", head.encode("latin-1") + b"\r\n" + self.body)


def wire_request(base_url: str, method: str, path: str, payload: dict | None = None) -> WireRequest:
    """Render a request once; ``stream`` comes from the payload's own ``stream`` flag."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    headers = [("Host", f"{host}:{port}"), ("Connection", "close")]
    if payload is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    stream = bool(payload and payload.get("stream"))
    if stream:
        headers.append(("Accept", "text/event-stream"))
    return WireRequest(host, port, method, path, tuple(headers), body, stream)


class HttpClient:
    """A synchronous facade over the one reader, with its own event loop."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()

    def wire(self, method: str, path: str, payload: dict | None = None) -> WireRequest:
        return wire_request(self.base_url, method, path, payload)

    # -- plain requests -------------------------------------------------
    def get_json(self, path: str, timeout_s: float | None = None):
        return json.loads(self._plain("GET", path, None, timeout_s))

    def get_text(self, path: str, timeout_s: float | None = None) -> str:
        return self._plain("GET", path, None, timeout_s)

    def post_json(self, path: str, payload: dict, timeout_s: float | None = None):
        return json.loads(self._plain("POST", path, payload, timeout_s))

    def _plain(self, method: str, path: str, payload: dict | None, timeout_s: float | None) -> str:
        return self.send(self.wire(method, path, payload), timeout_s).body or ""

    # -- timed requests: the stream reader --------------------------------
    def exchange(self, path: str, payload: dict, client: str = "harness") -> StreamResult:
        """POST ``payload``; streamed (SSE) when ``payload["stream"]``, else the JSON body as ``fields``.

        ``client="reference"`` sends the same bytes through the stdlib reference client instead.
        """
        wire = self.wire("POST", path, payload)
        if client == "reference":
            from kvmatrix.runners.backends.reference import reference_exchange  # noqa: PLC0415 - it imports this module

            return reference_exchange(wire, self.timeout_s)
        return as_json(self.send(wire))

    def send(self, wire: WireRequest, timeout_s: float | None = None) -> StreamResult:
        return self.loop.run_until_complete(self._exchange(wire, timeout_s or self.timeout_s))

    def stream_many(self, path: str, payloads: list[dict], concurrency: int) -> list[tuple[float, StreamResult | Exception]]:
        """Stream ``payloads`` with at most ``concurrency`` requests in flight, through the same reader.

        Returns, in payload order, (perf_counter when the request was sent, its
        StreamResult) or (that time, the exception) for a request that failed,
        so one failed request does not lose the others' measurements.
        """
        return self.loop.run_until_complete(self._many(path, payloads, max(1, concurrency)))

    async def _many(self, path: str, payloads: list[dict], concurrency: int):
        gate = asyncio.Semaphore(concurrency)

        async def one(payload: dict):
            async with gate:
                sent = time.perf_counter()
                try:
                    return sent, await self._exchange(self.wire("POST", path, payload), self.timeout_s)
                except (TimeoutError, HttpError, OSError, ValueError) as exc:
                    return sent, exc

        return await asyncio.gather(*(one(p) for p in payloads))

    async def _exchange(self, wire: WireRequest, timeout_s: float) -> StreamResult:
        t0 = time.perf_counter()
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(wire.host, wire.port)
            start = time.perf_counter()
            try:
                writer.write(wire.data)
                sent = time.perf_counter()
                status, headers = await _read_head(reader)
                first_byte = time.perf_counter()
                events = SseEvents() if wire.stream and status < 400 else None
                raw = bytearray()
                async for piece in _body(reader, headers):
                    if events is not None:
                        events.feed(piece, time.perf_counter())
                    else:
                        raw += piece
                t_end = time.perf_counter()
            finally:
                writer.close()
        if status >= 400:
            raise HttpError(status, bytes(raw[:500]).decode(errors="replace"))
        result = StreamResult(ttft_s=None, total_s=t_end - start, connect_s=start - t0, text="", chunks=0,
                              send_s=sent - start, first_byte_s=first_byte - start, status=status)
        if events is None:
            result.body = raw.decode(errors="replace")
            return result
        return events.result(result, start)


def as_json(r: StreamResult) -> StreamResult:
    """A non-streamed result's JSON body as its ``fields`` (after the clock stopped)."""
    if r.body is not None:
        r.fields = json.loads(r.body)
    return r


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad HTTP status line {status_line[:80]!r}")
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(parts[1]), headers
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()


async def _body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]):
    """The response body as it arrives: chunked, by Content-Length, or until the server closes."""
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the CRLF after the last chunk (no trailers are sent here)
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif b"content-length" in headers:
        yield await reader.readexactly(int(headers[b"content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


class SseEvents:
    """Splits server-sent events from body pieces; TTFT = arrival of the piece completing the first content event."""

    def __init__(self):
        self.buffer = b""
        self.ttft_at: float | None = None
        self.first_finish: float | None = None
        self.parts: list[str] = []
        self.fields: dict = {}
        self.finish: str | None = None
        self.chunks = 0

    def feed(self, piece: bytes, arrived: float) -> None:
        self.buffer += piece
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            event = parse_sse_line(line)
            if event is None:
                continue
            self.chunks += 1
            text, fin = content_of(event)
            if fin and self.first_finish is None:
                self.first_finish = arrived
            if text:
                if self.ttft_at is None:
                    self.ttft_at = arrived
                self.parts.append(text)
            self.finish = fin or self.finish
            for key, value in event.items():
                if key not in ("choices", "content") and value is not None:
                    self.fields[key] = value

    def result(self, r: StreamResult, start: float) -> StreamResult:
        ttft_at = self.ttft_at
        if ttft_at is None and self.first_finish is not None:
            # the first token decoded to no visible text (EOS, a partial UTF-8 byte):
            # the event that closes the choice is the earliest sign of it
            ttft_at = self.first_finish
            self.fields["_ttft_from_finish_chunk"] = True
        r.ttft_s = None if ttft_at is None else ttft_at - start
        r.text, r.chunks, r.fields, r.finish_reason = "".join(self.parts), self.chunks, self.fields, self.finish
        return r


class HttpError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def parse_sse_line(line: bytes) -> dict | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def content_of(event: dict) -> tuple[str, str | None]:
    """Text and finish reason of an event: chat (``delta.content``), completion (``text``) or llama.cpp's
    native ``/completion`` (``content``, ``stop``)."""
    choices = event.get("choices")
    if choices is None and "content" in event:
        return event.get("content") or "", ("stop" if event.get("stop") else None)
    if not choices:
        return "", None
    choice = choices[0]
    delta = choice.get("delta")
    piece = (delta or {}).get("content") if delta is not None else choice.get("text")
    return piece or "", choice.get("finish_reason")
