#!/usr/bin/env python3
"""A proxy for vLLM's disaggregated serving with kvrail's KvrailConnector:
every OpenAI completion or chat request runs in two stages.

1. Prefill: the client's request goes to a prefill vLLM (``kv_role``
   ``kv_producer``) with one token to generate (``max_tokens`` and
   ``max_completion_tokens`` 1, ``stream`` false) and
   ``kv_transfer_params: {"do_remote_decode": true}``. Its connector publishes
   the prompt's KV blocks with its kvrail agent and answers with the
   ``kv_transfer_params`` that name them (``remote_agent_id``,
   ``remote_agent_address``, ``remote_request_id``, ``remote_block_ids``, ...).
2. Decode: the client's original request, with exactly those
   ``kv_transfer_params``, goes to a decode vLLM (``kv_consumer``), whose agent
   pulls the blocks from the prefill agent. Its answer, streamed or not, is
   the client's.

The proxy reads no field of the parameters: it copies them. Instances are taken
round robin per stage. A failure in either stage reaches the client as an HTTP
error in OpenAI's shape, naming the stage and the instance; a failed prefill is
never followed by a decode. Both stages carry the client's ``X-Request-Id``
(one is made if it has none) and ``Authorization``.

Python's standard library only::

    python3 proxy.py --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200

When it serves it prints one JSON line on stdout (``"event": "ready"``).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import socket
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence

TWO_STAGE_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_REQUEST_BYTES = 64 << 20
"""Largest client request body accepted."""
ERROR_BODY_BYTES = 64 << 10
"""How much of an instance's error answer is read for the message."""
STREAM_READ_BYTES = 64 << 10


class StageError(Exception):
    """A stage that failed: which one, at which instance, the HTTP status the
    client gets and a message a person can act on."""

    def __init__(self, stage: str, instance: str, status: int, message: str):
        super().__init__(message)
        self.stage = stage
        self.instance = instance
        self.status = status
        self.message = message

    def body(self) -> bytes:
        return error_body(self.status, self.message, stage=self.stage, instance=self.instance)


def error_body(status: int, message: str, **extra: str) -> bytes:
    """An error in vLLM's (OpenAI's) shape, with the stage and the instance."""
    err = {"message": message, "type": "kvrail_proxy_error", "param": None, "code": status, **extra}
    return json.dumps({"error": err}).encode()


class RoundRobin:
    """The instances of one stage, taken in turn (thread-safe)."""

    def __init__(self, stage: str, urls: Sequence[str]):
        if not urls:
            raise ValueError(f"no {stage} instance: give --{stage} URL at least once")
        self.stage = stage
        self.urls = [check_url(stage, u) for u in urls]
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
        return url


def check_url(stage: str, url: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise ValueError(f"--{stage} {url!r} is not an instance's base URL such as http://HOST:PORT")
    return url.rstrip("/")


def prefill_request(body: dict, chat: bool) -> dict:
    """The prefill stage's request: one token, not streamed, and the
    connector told to hold the prompt's blocks for a remote decode."""
    req = dict(body)
    req["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    req["stream"] = False
    req["max_tokens"] = 1
    if chat or "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    # vLLM refuses stream_options without stream, and a minimum above one
    # token contradicts the one token asked for.
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        req.pop(key, None)
    return req


def decode_request(body: dict, kv_transfer_params: dict) -> dict:
    """The decode stage's request: the client's, with the prefill's
    parameters exactly as it returned them."""
    req = dict(body)
    req["kv_transfer_params"] = kv_transfer_params
    return req


class Upstream:
    """One call to an instance: the connection stays open while its answer
    is relayed."""

    def __init__(self, stage: str, base_url: str, timeout_s: float):
        self.stage = stage
        self.instance = base_url
        u = urllib.parse.urlsplit(base_url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self._prefix = u.path.rstrip("/")
        self._conn = conn_cls(u.hostname, u.port, timeout=timeout_s)

    def post(self, path: str, body: dict, headers: dict[str, str]) -> http.client.HTTPResponse:
        data = json.dumps(body).encode()
        h = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        try:
            self._conn.request("POST", self._prefix + path, body=data, headers=h)
            return self._conn.getresponse()
        except (TimeoutError, socket.timeout) as e:
            raise self.failed(504, f"did not answer in time ({e or 'timed out'})") from e
        except OSError as e:
            raise self.failed(502, f"unreachable: {e}") from e
        except http.client.HTTPException as e:
            raise self.failed(502, f"broke the HTTP exchange: {e!r}") from e

    def get(self, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        try:
            self._conn.request("GET", self._prefix + path, headers=headers)
            return self._conn.getresponse()
        except (TimeoutError, socket.timeout) as e:
            raise self.failed(504, f"did not answer in time ({e or 'timed out'})") from e
        except (OSError, http.client.HTTPException) as e:
            raise self.failed(502, f"unreachable: {e}") from e

    def refused(self, resp: http.client.HTTPResponse) -> StageError:
        """The error for an answer other than 200: the instance's own
        message, its status for a client error (4xx), 502 otherwise."""
        raw = resp.read(ERROR_BODY_BYTES)
        message = raw.decode(errors="replace").strip()
        try:
            v = json.loads(raw)
            message = (v.get("error") or {}).get("message") or v.get("message") or message
        except (ValueError, AttributeError):
            pass
        status = resp.status if 400 <= resp.status < 500 else 502
        return self.failed(status, f"answered HTTP {resp.status}: {message or resp.reason}")

    def failed(self, status: int, what: str) -> StageError:
        return StageError(self.stage, self.instance, status, f"{self.stage} instance {self.instance} {what}")

    def close(self) -> None:
        self._conn.close()


class DisaggProxy:
    """The two-stage flow over round-robin prefill and decode instances."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], timeout_s: float = 600.0):
        self.prefill = RoundRobin("prefill", prefill)
        self.decode = RoundRobin("decode", decode)
        self.timeout_s = timeout_s

    def run_prefill(self, path: str, body: dict, headers: dict[str, str]) -> dict:
        """Stage 1; returns the prefill's kv_transfer_params."""
        up = Upstream("prefill", self.prefill.pick(), self.timeout_s)
        try:
            resp = up.post(path, prefill_request(body, chat=path.endswith("/chat/completions")), headers)
            if resp.status != 200:
                raise up.refused(resp)
            try:
                answer = json.loads(resp.read())
            except (ValueError, OSError, http.client.HTTPException) as e:
                raise up.failed(502, f"sent an answer that is not JSON ({e})") from e
        finally:
            up.close()
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            raise up.failed(
                502,
                "returned no kv_transfer_params: is it started with --kv-transfer-config naming KvrailConnector "
                'and "kv_role":"kv_producer", and did the prefill finish normally?',
            )
        return params

    def start_decode(self, path: str, body: dict, params: dict, headers: dict[str, str]) -> tuple[Upstream, http.client.HTTPResponse]:
        """Stage 2 up to the decode's status line; the caller relays the body
        and closes the upstream."""
        up = Upstream("decode", self.decode.pick(), self.timeout_s)
        try:
            resp = up.post(path, decode_request(body, params), headers)
            if resp.status != 200:
                raise up.refused(resp)
        except BaseException:
            up.close()
            raise
        return up, resp


def relay_chunks(up: Upstream, resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """The decode's answer as it arrives; a break mid-answer raises a
    StageError naming the decode instance."""
    while True:
        try:
            chunk = resp.read1(STREAM_READ_BYTES)
        except (OSError, http.client.HTTPException) as e:
            raise up.failed(502, f"broke off its answer: {e!r}") from e
        if not chunk:
            return
        yield chunk


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvrail-disagg-proxy"
    proxy: DisaggProxy  # set on the subclass the server is made with

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write(f"proxy: {self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_json(200, b'{"status":"ok"}')
        elif self.path == "/v1/models":
            self.forward_get("/v1/models")
        else:
            self.send_json(404, error_body(404, f"the proxy serves POST {' and '.join(TWO_STAGE_PATHS)}, GET /v1/models and /health"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in TWO_STAGE_PATHS:
            self.drain_body()
            self.send_json(404, error_body(404, f"the proxy serves POST {' and '.join(TWO_STAGE_PATHS)}, not {path}"))
            return
        body = self.read_json()
        if body is None:
            return
        headers = self.upstream_headers()
        try:
            params = self.proxy.run_prefill(path, body, headers)
            up, resp = self.proxy.start_decode(path, body, params, headers)
        except StageError as e:
            self.log_error("%s", e.message)
            self.send_json(e.status, e.body(), headers)
            return
        try:
            self.relay(up, resp, headers)
        finally:
            up.close()

    def relay(self, up: Upstream, resp: http.client.HTTPResponse, headers: dict[str, str]) -> None:
        """The decode's answer to the client: whole with its length, or
        chunk by chunk as it comes (a stream)."""
        ctype = resp.getheader("Content-Type", "application/json")
        length = resp.getheader("Content-Length")
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Request-Id", headers["X-Request-Id"])
        if length is not None:
            self.send_header("Content-Length", length)
            self.end_headers()
            try:
                for chunk in relay_chunks(up, resp):
                    self.wfile.write(chunk)
            except StageError as e:
                # The client sees a short body on a closed connection.
                self.log_error("%s", e.message)
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for chunk in relay_chunks(up, resp):
                self.write_chunk(chunk)
        except StageError as e:
            self.log_error("%s", e.message)
            if ctype.startswith("text/event-stream"):
                self.write_chunk(b"data: " + e.body() + b"\n\n")
        except (BrokenPipeError, ConnectionResetError):
            # The client left: closing the decode's connection aborts its request.
            self.close_connection = True
            return
        self.write_chunk(b"")

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def forward_get(self, path: str) -> None:
        up = Upstream("decode", self.proxy.decode.pick(), self.proxy.timeout_s)
        try:
            resp = up.get(path, self.upstream_headers())
            if resp.status != 200:
                raise up.refused(resp)
            self.send_json(200, resp.read())
        except StageError as e:
            self.send_json(e.status, e.body())
        finally:
            up.close()

    def upstream_headers(self) -> dict[str, str]:
        h = {"X-Request-Id": self.headers.get("X-Request-Id") or uuid.uuid4().hex}
        if self.headers.get("Authorization"):
            h["Authorization"] = self.headers["Authorization"]
        return h

    def drain_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= MAX_REQUEST_BYTES:
            self.rfile.read(n)
        else:
            self.close_connection = True

    def read_json(self) -> dict | None:
        """The client's JSON object, or None once an error is sent."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self.send_json(411, error_body(411, "send the request body with a Content-Length (no Transfer-Encoding)", stage="proxy"))
            return None
        try:
            n = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_REQUEST_BYTES:
            self.close_connection = True
            status = 413 if n > MAX_REQUEST_BYTES else 411
            self.send_json(status, error_body(status, f"send a request body of at most {MAX_REQUEST_BYTES} bytes with its Content-Length", stage="proxy"))
            return None
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except ValueError as e:
            self.send_json(400, error_body(400, f"the request body is not JSON: {e}", stage="proxy"))
            return None
        if not isinstance(body, dict):
            self.send_json(400, error_body(400, "the request body must be a JSON object", stage="proxy"))
            return None
        return body

    def send_json(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if headers and "X-Request-Id" in headers:
            self.send_header("X-Request-Id", headers["X-Request-Id"])
        self.end_headers()
        self.wfile.write(data)


def make_server(proxy: DisaggProxy, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """The proxy's HTTP server (not yet serving): one thread per connection."""
    handler = type("BoundHandler", (Handler,), {"proxy": proxy})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Two-stage proxy for vLLM disaggregated serving with KvrailConnector (prefill, then decode).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--prefill", action="extend", nargs="+", required=True, metavar="URL", help="a prefill vLLM's base URL (kv_producer); repeat or list several")
    p.add_argument("--decode", action="extend", nargs="+", required=True, metavar="URL", help="a decode vLLM's base URL (kv_consumer); repeat or list several")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="how long either stage may stay silent (default 600)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        proxy = DisaggProxy(args.prefill, args.decode, args.timeout)
        server = make_server(proxy, args.host, args.port)
    except (ValueError, OSError) as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    ready = {"event": "ready", "listen": f"{host}:{port}", "prefill": proxy.prefill.urls, "decode": proxy.decode.urls}
    print(json.dumps(ready), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
