"""The timing control's pure logic: the one stream reader and the reference client against a local
fake HTTP server (same bytes on the wire, the TTFT rule), the breakdown arithmetic, the calibration block."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from kvmatrix.runners.backends.http import HttpClient, HttpError
from kvmatrix.runners.backends.reference import reference_exchange
from kvmatrix.runners.calibration import block, breakdown, median_ci

DELAY_S = 0.08


class FakeServer:
    """A raw-socket HTTP/1.1 server: records each request's bytes and answers with a scripted response.

    ``/sse``: chunked SSE: a role event, then after DELAY_S the first content event, a finish event
    with usage + timings, [DONE].  ``/json``: a JSON body with Content-Length.  ``/bad``: HTTP 400.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                                   if ln.lower().startswith(b"content-length")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(data[: len(head) + 4] + body)
                path = head.split(b" ")[1]
                if path == b"/sse":
                    self._sse(conn)
                elif path == b"/json":
                    payload = json.dumps({"content": "hi", "timings": {"cache_n": 7}}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                else:
                    msg = b'{"error":"nope"}'
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: " + str(len(msg)).encode()
                                 + b"\r\n\r\n" + msg)

    @staticmethod
    def _sse(conn):
        def chunk(event: dict | str) -> bytes:
            line = ("data: " + (event if isinstance(event, str) else json.dumps(event)) + "\n\n").encode()
            return f"{len(line):x}\r\n".encode() + line + b"\r\n"

        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(chunk({"choices": [{"delta": {"role": "assistant", "content": ""}}]}))
        time.sleep(DELAY_S)
        conn.sendall(chunk({"choices": [{"delta": {"content": "Hello"}}]}))
        conn.sendall(chunk({"choices": [{"delta": {}, "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 1}, "timings": {"cache_n": 4}}))
        conn.sendall(chunk("[DONE]") + b"0\r\n\r\n")

    def close(self):
        self.stop = True
        self.sock.close()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def test_stream_reader_and_reference_send_the_same_bytes_and_agree_on_ttft(server):
    client = HttpClient(f"http://127.0.0.1:{server.port}")
    payload = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 1}
    try:
        h = client.exchange("/sse", payload)
        r = client.exchange("/sse", payload, client="reference")
    finally:
        client.close()
    assert server.requests[0] == server.requests[1]  # byte-identical requests
    for res in (h, r):
        assert DELAY_S <= res.ttft_s < DELAY_S + 0.5  # the empty role event does not count as content
        assert res.text == "Hello"
        assert res.fields["usage"]["prompt_tokens"] == 5 and res.fields["timings"]["cache_n"] == 4
        assert res.finish_reason == "length"
        assert res.first_byte_s is not None and res.first_byte_s < res.ttft_s <= res.total_s
        assert res.connect_s >= 0


def test_plain_json_and_errors(server):
    client = HttpClient(f"http://127.0.0.1:{server.port}")
    try:
        h = client.exchange("/json", {"prompt": [1, 2], "stream": False})
        r = client.exchange("/json", {"prompt": [1, 2], "stream": False}, client="reference")
        assert h.fields == r.fields == {"content": "hi", "timings": {"cache_n": 7}}
        assert h.ttft_s is None and h.total_s > 0
        assert client.get_json("/json")["content"] == "hi"
        with pytest.raises(HttpError) as exc:
            client.exchange("/bad", {"stream": True})
        assert exc.value.status == 400 and "nope" in exc.value.body
        with pytest.raises(HttpError):
            client.exchange("/bad", {"stream": True}, client="reference")
    finally:
        client.close()


def test_stream_many_through_the_same_reader(server):
    client = HttpClient(f"http://127.0.0.1:{server.port}")
    try:
        out = client.stream_many("/sse", [{"stream": True}] * 3, concurrency=1)
    finally:
        client.close()
    assert [r.text for _, r in out] == ["Hello"] * 3


def test_breakdown_parts_add_up():
    b = breakdown(10.0, 0.1, 2.0, 6.5)
    assert b["client_ms"] + b["engine_ms"] + b["interface_ms"] == pytest.approx(10.0)
    assert b["interface_ms"] == pytest.approx(3.4)
    assert breakdown(5.0, None, None, None)["interface_ms"] == 5.0  # in-process, no engine counter
    assert breakdown(None, 0.1, 1.0, 1.0) == {}


def test_median_ci_and_block():
    ci = median_ci([1.0, 2.0, 3.0, 4.0, 100.0])
    assert ci["median"] == 3.0 and ci["ci_low"] <= 3.0 <= ci["ci_high"] and ci["n"] == 5
    assert median_ci([]) == {"n": 0, "median": None, "ci_low": None, "ci_high": None}
    trials = {
        "cache_hit": [{"warmup": True, "ttft_ms": 9.0, "reference_ttft_ms": 8.0, "cached_tokens": 5,
                       "reference_cached_tokens": 5, "reference_verified": True}]
        + [{"warmup": False, "ttft_ms": 10.0 + i, "reference_ttft_ms": 9.0 + i, "cached_tokens": 5,
            "reference_cached_tokens": 5, "reference_verified": True, "tokenid_ttft_ms": 7.0 + i,
            "tokenid_verified": True, "breakdown": breakdown(10.0 + i, 0.1, 1.0, 4.0)} for i in range(6)],
        "cache_miss": [{"warmup": False, "ttft_ms": 20.0, "reference_ttft_ms": 20.5, "cached_tokens": 1,
                        "reference_cached_tokens": 2, "reference_verified": False}],
    }
    b = block(trials, "stdlib", True)
    hit = b["conditions"]["cache_hit"]
    assert hit["n"] == 6 and hit["difference_ms"]["median"] == pytest.approx(1.0)
    assert hit["difference_ms"]["ci_low"] == pytest.approx(1.0) == hit["difference_ms"]["ci_high"]
    assert hit["template_cost_ms"]["median"] == pytest.approx(3.0)
    assert hit["same_cached_tokens"] == 6 and hit["reference_verified"] == 6
    assert hit["breakdown_ms"]["engine_ms"] == 4.0
    assert b["conditions"]["warmup"]["n"] == 1
    miss = b["conditions"]["cache_miss"]
    assert miss["difference_ms"]["median"] == pytest.approx(-0.5) and miss["same_cached_tokens"] == 0
