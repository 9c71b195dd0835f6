"""HTTP client side shared by every server engine: ONE stream reader.

``HttpClient.post_json`` sends a request and returns the parsed body;
``HttpClient.stream_chat`` sends a streaming OpenAI-style request and reads
the server-sent events once, for every engine: it timestamps the first chunk
that carries content (TTFT), collects the text, and keeps every non-content
field that chunks carry (``usage``, llama.cpp's ``timings``, ...) in
``StreamResult.fields`` for the adapter to interpret.

Each request opens a fresh connection (llama-server closes the connection
after a streamed response, which breaks pooled keep-alive connections);
the connection set-up time is measured separately through aiohttp tracing
and kept OUT of the timed region.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class StreamResult:
    ttft_s: float | None
    total_s: float
    connect_s: float
    text: str
    chunks: int
    fields: dict = field(default_factory=dict)  # last value of each non-choices field seen
    finish_reason: str | None = None


class HttpClient:
    """A small synchronous facade over aiohttp with its own event loop."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()

    # -- plain requests -------------------------------------------------
    def get_json(self, path: str, timeout_s: float | None = None):
        return self.loop.run_until_complete(self._request("GET", path, None, timeout_s))

    def get_text(self, path: str, timeout_s: float | None = None) -> str:
        return self.loop.run_until_complete(self._request("GET", path, None, timeout_s, as_text=True))

    def post_json(self, path: str, payload: dict, timeout_s: float | None = None):
        return self.loop.run_until_complete(self._request("POST", path, payload, timeout_s))

    async def _request(self, method, path, payload, timeout_s, as_text=False):
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else self.timeout
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            async with session.request(method, self.base_url + path, json=payload) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise HttpError(resp.status, body[:500])
                return body if as_text else json.loads(body)

    # -- the stream reader ------------------------------------------------
    def stream_chat(self, path: str, payload: dict) -> StreamResult:
        return self.loop.run_until_complete(self._stream(path, payload))

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
                    return sent, await self._stream(path, payload)
                except (TimeoutError, HttpError, aiohttp.ClientError, OSError) as exc:
                    return sent, exc

        return await asyncio.gather(*(one(p) for p in payloads))

    def timed_post(self, path: str, payload: dict) -> tuple[dict, float, float]:
        """Non-streaming POST; returns (body, seconds after connect, connect seconds)."""
        return self.loop.run_until_complete(self._timed_post(path, payload))

    async def _timed_post(self, path, payload):
        marks: dict[str, float] = {}
        async with self._session(marks) as session:
            t0 = time.perf_counter()
            async with session.post(self.base_url + path, json=payload) as resp:
                body = await resp.read()
                t_end = time.perf_counter()
                if resp.status >= 400:
                    raise HttpError(resp.status, body[:500].decode(errors="replace"))
        start = marks.get("connected", t0)
        return json.loads(body), t_end - start, start - t0

    def _session(self, marks: dict[str, float]) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()

        async def connected(_session, _ctx, _params):
            marks["connected"] = time.perf_counter()

        trace.on_connection_create_end.append(connected)
        conn = aiohttp.TCPConnector(force_close=True)
        return aiohttp.ClientSession(connector=conn, timeout=self.timeout, trace_configs=[trace])

    async def _stream(self, path: str, payload: dict) -> StreamResult:
        marks: dict[str, float] = {}
        ttft_at = None
        text_parts: list[str] = []
        fields: dict = {}
        finish = None
        first_finish = None
        chunks = 0
        async with self._session(marks) as session:
            t0 = time.perf_counter()
            async with session.post(self.base_url + path, json=payload) as resp:
                if resp.status >= 400:
                    raise HttpError(resp.status, (await resp.text())[:500])
                buffer = b""
                async for raw in resp.content.iter_any():
                    buffer += raw
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        event = _parse_sse_line(line)
                        if event is None:
                            continue
                        chunks += 1
                        piece, fin = _content_of(event)
                        if fin and first_finish is None:
                            first_finish = time.perf_counter()
                        if piece:
                            if ttft_at is None:
                                ttft_at = time.perf_counter()
                            text_parts.append(piece)
                        finish = fin or finish
                        for key, value in event.items():
                            if key != "choices" and value is not None:
                                fields[key] = value
                t_end = time.perf_counter()
        start = marks.get("connected", t0)
        if ttft_at is None and first_finish is not None:
            # the first token decoded to no visible text (EOS, a partial UTF-8 byte):
            # the chunk that closes the choice is the earliest sign of it
            ttft_at = first_finish
            fields["_ttft_from_finish_chunk"] = True
        return StreamResult(
            ttft_s=None if ttft_at is None else ttft_at - start,
            total_s=t_end - start,
            connect_s=start - t0,
            text="".join(text_parts),
            chunks=chunks,
            fields=fields,
            finish_reason=finish,
        )


class HttpError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _parse_sse_line(line: bytes) -> dict | None:
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


def _content_of(event: dict) -> tuple[str, str | None]:
    """Text delta and finish reason of a chat (delta.content) or completion (text) chunk."""
    choices = event.get("choices") or []
    if not choices:
        return "", None
    choice = choices[0]
    delta = choice.get("delta")
    piece = (delta or {}).get("content") if delta is not None else choice.get("text")
    return piece or "", choice.get("finish_reason")
