"""Tests of the two-stage proxy (proxy.py) against stand-ins for vLLM's OpenAI
server.

vLLM itself cannot run here (no GPU, and importing it needs torch), so each
instance is a small HTTP server playing vLLM's /v1/completions and
/v1/chat/completions and recording what it received. The stand-ins do run
kvrail's real connector bookkeeping (``kvrail_vllm.scheduler``, no vLLM
import): a prefill stand-in answers with the kv_transfer_params its
``KvrailScheduler.request_finished`` returns for the request the proxy sent,
and a decode stand-in feeds what it received to ``num_new_matched_tokens`` and
``after_alloc`` and records the pull they plan. So "the decode stage got what
the prefill returned" is checked by the code that reads it in vLLM.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "python"))

import proxy  # noqa: E402
from kvrail_vllm.scheduler import KvrailScheduler, Remote  # noqa: E402

PROMPT_TOKENS = 48
BLOCK_TOKENS = 16


class StandIn:
    """One vLLM OpenAI server: ``role`` prefill or decode; ``mode`` ok,
    error (HTTP 500), bad-request (HTTP 400), no-params (prefill without a
    connector) or break (decode: the stream stops mid-answer)."""

    def __init__(self, name: str, role: str, index: int, mode: str = "ok"):
        self.name, self.role, self.index, self.mode = name, role, index, mode
        self.received: list[tuple[str, dict[str, str], dict]] = []
        self.answered: list[dict] = []  # prefill: the kv_transfer_params it returned
        self.pulls: list = []  # decode: the pulls its scheduler planned
        self.gate = threading.Event()  # decode stream: the rest is sent once set
        self.rest_sent = threading.Event()
        standin = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                standin.received.append((self.path, dict(self.headers), json.loads(raw)))
                # The scheduler marks the parameters it consumed, as vLLM's does.
                standin.answer(self, json.loads(raw))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, h, body: dict) -> None:
        if self.mode == "error":
            return send(h, 500, {"error": {"message": "boom: no free KV blocks", "type": "InternalServerError", "param": None, "code": 500}})
        if self.mode == "bad-request":
            return send(h, 400, {"error": {"message": "model 'nope' does not exist", "type": "NotFoundError", "param": None, "code": 400}})
        rid = f"cmpl-{h.headers['X-Request-Id']}-0"
        req = SimpleNamespace(request_id=rid, prompt_token_ids=list(range(PROMPT_TOKENS)), kv_transfer_params=body.get("kv_transfer_params"))
        if self.role == "prefill":
            return self.answer_prefill(h, req)
        return self.answer_decode(h, req, body)

    def answer_prefill(self, h, req) -> None:
        sched = KvrailScheduler("producer", engine_id=f"{self.name}-engine")
        sched.set_agent(f"{self.name}-agent", f"127.0.0.1:{7100 + self.index}")
        blocks = [10 * self.index + b for b in range(PROMPT_TOKENS // BLOCK_TOKENS)]
        hold, params = sched.request_finished(req, blocks, finished_normally=True)
        out = {"id": req.request_id, "object": "text_completion", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}
        if hold and self.mode != "no-params":
            out["kv_transfer_params"] = params
            self.answered.append(params)
        send(h, 200, out)

    def answer_decode(self, h, req, body: dict) -> None:
        sched = KvrailScheduler("consumer", engine_id=f"{self.name}-engine")
        count, is_async = sched.num_new_matched_tokens(req, 0)
        if not (count and is_async):
            return send(h, 400, {"error": {"message": "no remote prefill in kv_transfer_params", "type": "BadRequestError", "param": None, "code": 400}})
        sched.after_alloc(req, [900 + b for b in range(PROMPT_TOKENS // BLOCK_TOKENS)], count)
        self.pulls.extend(sched.build_step().pulls)
        if not body.get("stream"):
            return send(h, 200, {"id": req.request_id, "object": "text_completion", "choices": [{"index": 0, "text": f"decoded by {self.name}", "finish_reason": "stop"}]})
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk(h, sse({"choices": [{"index": 0, "text": "first"}]}))
        if self.mode == "break":
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self.gate.wait(5)
        chunk(h, sse({"choices": [{"index": 0, "text": f" then {self.name}"}]}))
        chunk(h, b"data: [DONE]\n\n")
        chunk(h, b"")
        self.rest_sent.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def send(h, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(h, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


@pytest.fixture
def cluster():
    """Stand-ins and proxies made by a test, all stopped after it."""
    made: list = []

    class Cluster:
        def instance(self, role: str, mode: str = "ok") -> StandIn:
            s = StandIn(f"{role}{len(made)}", role, len(made), mode)
            made.append(s)
            return s

        def proxy(self, prefill: list[str], decode: list[str], timeout_s: float = 5.0) -> str:
            server = proxy.make_server(proxy.DisaggProxy(prefill, decode, timeout_s), "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            made.append(SimpleNamespace(close=lambda: (server.shutdown(), server.server_close())))
            return f"127.0.0.1:{server.server_address[1]}"

    yield Cluster()
    for m in reversed(made):
        m.close()


def post(addr: str, path: str, body, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), out


def unreachable_url() -> tuple[socket.socket, str]:
    """A port bound but not listening: connecting is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def test_prefill_gets_one_token_and_do_remote_decode_then_decode_gets_its_params_verbatim(cluster):
    p, d = cluster.instance("prefill"), cluster.instance("decode")
    addr = cluster.proxy([p.url], [d.url])
    body = {"model": "m", "prompt": "hello " * 40, "max_tokens": 64, "min_tokens": 8, "temperature": 0}
    status, headers, out = post(addr, "/v1/completions", body, {"X-Request-Id": "req-1", "Authorization": "Bearer k"})
    assert status == 200, out
    assert json.loads(out)["choices"][0]["text"] == f"decoded by {d.name}"
    assert headers["X-Request-Id"] == "req-1"

    [(ppath, pheaders, pbody)] = p.received
    assert ppath == "/v1/completions"
    assert pbody["max_tokens"] == 1 and pbody["stream"] is False
    assert pbody["kv_transfer_params"]["do_remote_decode"] is True
    assert "min_tokens" not in pbody and "max_completion_tokens" not in pbody
    assert pbody["prompt"] == body["prompt"]

    [(dpath, dheaders, dbody)] = d.received
    [params] = p.answered
    assert dpath == "/v1/completions"
    assert dbody["kv_transfer_params"] == params  # exactly what the prefill returned
    assert {k: v for k, v in dbody.items() if k != "kv_transfer_params"} == body  # the client's request otherwise
    for h in (pheaders, dheaders):
        assert h["X-Request-Id"] == "req-1" and h["Authorization"] == "Bearer k"
    # The decode side's scheduler pulls from the prefill side's agent, the
    # prefill's request and blocks.
    [pull] = d.pulls
    assert pull.remote == Remote(f"{p.name}-agent", "127.0.0.1:7100")
    assert pull.remote_request_id == "cmpl-req-1-0"
    assert list(pull.remote_blocks) == params["remote_block_ids"]


def test_a_chat_stream_passes_through_as_it_comes(cluster):
    p, d = cluster.instance("prefill"), cluster.instance("decode")
    addr = cluster.proxy([p.url], [d.url])
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream"
    first = resp.read1(65536)
    # The first event reached the client while the decode still held the rest back.
    assert b'"first"' in first and not d.rest_sent.is_set()
    d.gate.set()
    rest = resp.read()
    conn.close()
    assert rest.endswith(b"data: [DONE]\n\n") and f" then {d.name}".encode() in rest

    [(_, _, pbody)] = p.received
    assert (pbody["max_tokens"], pbody["max_completion_tokens"], pbody["stream"]) == (1, 1, False)
    assert "stream_options" not in pbody
    [(dpath, _, dbody)] = d.received
    assert dpath == "/v1/chat/completions"
    assert dbody["stream"] is True and dbody["max_completion_tokens"] == 50 and dbody["stream_options"] == {"include_usage": True}
    assert dbody["kv_transfer_params"] == p.answered[0]


def test_round_robin_spreads_requests_over_instances(cluster):
    ps = [cluster.instance("prefill") for _ in range(2)]
    ds = [cluster.instance("decode") for _ in range(3)]
    addr = cluster.proxy([p.url for p in ps], [d.url for d in ds])
    for i in range(6):
        status, _, out = post(addr, "/v1/completions", {"model": "m", "prompt": "p", "max_tokens": 4}, {"X-Request-Id": f"r{i}"})
        assert status == 200, out
    assert [len(p.received) for p in ps] == [3, 3]
    assert [len(d.received) for d in ds] == [2, 2, 2]
    # Each decode got the parameters of the prefill that served that request.
    served_by = {h["X-Request-Id"]: p for p in ps for (_, h, _) in p.received}
    for d in ds:
        for (_, h, body), pull in zip(d.received, d.pulls):
            p = served_by[h["X-Request-Id"]]
            assert body["kv_transfer_params"] in p.answered
            assert pull.remote.agent_id == f"{p.name}-agent"


def test_a_failing_prefill_is_a_clear_error_and_no_decode_is_called(cluster):
    bad, d = cluster.instance("prefill", mode="error"), cluster.instance("decode")
    addr = cluster.proxy([bad.url], [d.url])
    status, headers, out = post(addr, "/v1/completions", {"model": "m", "prompt": "p"}, {"X-Request-Id": "r-err"})
    err = json.loads(out)["error"]
    assert status == 502
    assert (err["stage"], err["instance"], err["code"]) == ("prefill", bad.url, 502)
    assert f"prefill instance {bad.url} answered HTTP 500: boom: no free KV blocks" == err["message"]
    assert headers["X-Request-Id"] == "r-err"
    assert d.received == []


def test_an_unreachable_prefill_or_one_without_the_connector_is_named(cluster):
    d = cluster.instance("decode")
    sock, down = unreachable_url()
    try:
        status, _, out = post(cluster.proxy([down], [d.url]), "/v1/completions", {"model": "m", "prompt": "p"})
    finally:
        sock.close()
    err = json.loads(out)["error"]
    assert status == 502 and err["stage"] == "prefill" and err["instance"] == down
    assert err["message"].startswith(f"prefill instance {down} unreachable:")

    plain = cluster.instance("prefill", mode="no-params")
    status, _, out = post(cluster.proxy([plain.url], [d.url]), "/v1/completions", {"model": "m", "prompt": "p"})
    err = json.loads(out)["error"]
    assert status == 502 and err["instance"] == plain.url and "returned no kv_transfer_params" in err["message"]
    assert d.received == []


def test_a_client_error_at_prefill_keeps_its_status(cluster):
    bad, d = cluster.instance("prefill", mode="bad-request"), cluster.instance("decode")
    status, _, out = post(cluster.proxy([bad.url], [d.url]), "/v1/completions", {"model": "nope", "prompt": "p"})
    err = json.loads(out)["error"]
    assert status == 400 and err["stage"] == "prefill" and "model 'nope' does not exist" in err["message"]
    assert d.received == []


def test_a_failing_decode_is_named_after_the_prefill_ran(cluster):
    p, bad = cluster.instance("prefill"), cluster.instance("decode", mode="error")
    status, _, out = post(cluster.proxy([p.url], [bad.url]), "/v1/completions", {"model": "m", "prompt": "p"})
    err = json.loads(out)["error"]
    assert status == 502 and (err["stage"], err["instance"]) == ("decode", bad.url)
    assert err["message"] == f"decode instance {bad.url} answered HTTP 500: boom: no free KV blocks"
    assert len(p.received) == 1 and len(bad.received) == 1


def test_a_decode_stream_that_breaks_ends_with_an_error_event_naming_it(cluster):
    p, d = cluster.instance("prefill"), cluster.instance("decode", mode="break")
    status, _, out = post(cluster.proxy([p.url], [d.url]), "/v1/completions", {"model": "m", "prompt": "p", "stream": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == "first"
    err = events[-1]["error"]
    assert (err["stage"], err["instance"]) == ("decode", d.url) and "broke off its answer" in err["message"]


def test_bad_client_input_is_refused_by_the_proxy_without_calling_an_instance(cluster):
    p, d = cluster.instance("prefill"), cluster.instance("decode")
    addr = cluster.proxy([p.url], [d.url])
    status, _, out = post(addr, "/v1/completions", b"{not json")
    assert status == 400 and json.loads(out)["error"]["stage"] == "proxy"
    status, _, out = post(addr, "/v1/completions", [1, 2])
    assert status == 400 and "JSON object" in json.loads(out)["error"]["message"]
    status, _, out = post(addr, "/v1/embeddings", {"model": "m"})
    assert status == 404 and "/v1/completions" in json.loads(out)["error"]["message"]
    assert p.received == [] and d.received == []


def test_the_command_line_serves_and_refuses_a_bad_url(cluster):
    p, d = cluster.instance("prefill"), cluster.instance("decode")
    cmd = [sys.executable, str(HERE / "proxy.py"), "--port", "0", "--prefill", p.url, "--decode", d.url]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(run.stdout.readline())
        assert ready["event"] == "ready" and ready["prefill"] == [p.url] and ready["decode"] == [d.url]
        status, _, out = post(ready["listen"], "/v1/completions", {"model": "m", "prompt": "p"})
        assert status == 200 and json.loads(out)["choices"][0]["text"] == f"decoded by {d.name}"
    finally:
        run.terminate()
        run.wait(5)
        run.stdout.close()
        run.stderr.close()
    bad = subprocess.run([sys.executable, str(HERE / "proxy.py"), "--prefill", "localhost:8100", "--decode", d.url], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "--prefill 'localhost:8100' is not an instance's base URL" in bad.stderr
