"""The reference client: the timing control for every server backend.

A minimal blocking client written only with the standard library
(``http.client``), deliberately NOT sharing the harness's transport: it
sends the same ``WireRequest`` bytes (same endpoint, same JSON, same stream
flag, same headers) on a fresh connection, opened before the clock starts,
and times

* a stream: from the established connection to the arrival of the first
  event that carries content (the line holding it has been read);
* a plain response: to the end of the body.

Nothing else runs inside the timed region. After the clock stops the
response is decoded (the same way the harness decodes it) so the adapter
reads the same engine counters from both clients.
"""

from __future__ import annotations

import http.client
import json
import time

from kvmatrix.runners.backends.http import HttpError, SseEvents, StreamResult, WireRequest, content_of, parse_sse_line


def reference_exchange(wire: WireRequest, timeout_s: float = 600.0) -> StreamResult:
    conn = http.client.HTTPConnection(wire.host, wire.port, timeout=timeout_s)
    t0 = time.perf_counter()
    conn.connect()
    start = time.perf_counter()
    try:
        conn.putrequest(wire.method, wire.path, skip_host=True, skip_accept_encoding=True)
        for key, value in wire.headers:
            conn.putheader(key, value)
        conn.endheaders(wire.body or None)
        resp = conn.getresponse()
        first_byte = time.perf_counter()
        ttft_at = None
        lines: list[tuple[bytes, float]] = []
        if wire.stream and resp.status < 400:
            while line := resp.readline():
                arrived = time.perf_counter()
                lines.append((line, arrived))
                if ttft_at is None and line.startswith(b"data:"):
                    event = parse_sse_line(line)
                    if event is not None and content_of(event)[0]:
                        ttft_at = arrived
            body = b""
        else:
            body = resp.read()
        t_end = time.perf_counter()
    finally:
        conn.close()
    if resp.status >= 400:
        raise HttpError(resp.status, body[:500].decode(errors="replace"))
    r = StreamResult(ttft_s=None, total_s=t_end - start, connect_s=start - t0, text="", chunks=0,
                     first_byte_s=first_byte - start, status=resp.status)
    if not wire.stream:
        r.fields = json.loads(body)
        return r
    events = SseEvents()  # decoded after the clock stopped: the same fields the harness keeps
    for line, arrived in lines:
        events.feed(line, arrived)
    events.result(r, start)
    if ttft_at is not None:
        r.ttft_s = ttft_at - start
    return r
