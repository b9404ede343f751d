"""The Sidecar API end to end, as a vLLM connector uses it: two real agents on
loopback started with --region-from-client, each handed a memfd region by this
process (the "engine"), a publish on the prefill side, a pull on the decode side,
and every byte checked through the engine's own view of the memory."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from kvrail_vllm.client import AgentError, Layout, SidecarClient, send_fd

BLOCK = 4096
LAYERS = 2
BLOCKS = 32
LAYOUT = dict(block_bytes=BLOCK, num_blocks=BLOCKS, num_layers=LAYERS, block_stride=BLOCK, layer_stride=BLOCKS * BLOCK)


class Engine:
    """What a vLLM worker holds: its KV cache as a shared file (here a memfd),
    and its agent's local API."""

    def __init__(self, agents, tmp_path, role: str, offset: int, *extra: str):
        self.layout = Layout(**LAYOUT, offset=offset)
        self.fd = os.memfd_create(f"kv-{role}")
        self.size = self.layout.end()
        os.ftruncate(self.fd, self.size)
        self.socket = str(tmp_path / f"{role}.sock")
        self.agent = agents(role, "--region-from-client", "--local-socket", self.socket, "--transport", "tcp", *extra, name=role)
        waiting = self.agent.event("waiting_for_region")
        assert waiting["fd_socket"] == self.socket + ".fd"
        self.client = SidecarClient(self.socket)
        self.role = role

    def attach(self) -> tuple[str, str]:
        return self.client.attach_host_region(fd=self.fd, region_bytes=self.size, tensors=[self.layout], engine_id=f"engine-{self.role}", role=self.role, model_hash="model-a")

    def offset(self, block: int, layer: int) -> int:
        return self.layout.offset + layer * self.layout.layer_stride + block * self.layout.block_stride

    def write_block(self, block: int, seed: int) -> None:
        for layer in range(LAYERS):
            os.pwrite(self.fd, bytes([(seed + layer) % 256]) * BLOCK, self.offset(block, layer))

    def block(self, block: int) -> list[bytes]:
        return [os.pread(self.fd, BLOCK, self.offset(block, layer)) for layer in range(LAYERS)]


def poll_until(client: SidecarClient, want, timeout_s: float = 20.0):
    """Polls until `want(finished)` holds on what was gathered; returns it."""
    from kvrail_vllm.client import Finished

    got = Finished()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        f = client.poll()
        got.sending |= f.sending
        got.recving |= f.recving
        got.failed.update(f.failed)
        got.invalid_blocks.extend(f.invalid_blocks)
        if want(got):
            return got
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout_s} s: {got}")


@pytest.fixture
def pair(agents, tmp_path):
    decode = Engine(agents, tmp_path, "decode", 4096)
    with pytest.raises(AgentError) as e:
        decode.client.poll()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "call AttachRegion first" in str(e.value)
    decode_id, decode_addr = decode.attach()
    assert decode_id and decode_addr.startswith("127.0.0.1:")
    decode.agent.event("ready")
    prefill = Engine(agents, tmp_path, "prefill", 0, "--peer", decode_addr)
    prefill_id, _ = prefill.attach()
    prefill.agent.event("ready")
    yield decode, prefill, prefill_id
    decode.client.close()
    prefill.client.close()


def test_a_published_request_is_pulled_byte_for_byte_then_freed(pair):
    decode, prefill, prefill_id = pair
    for b in (3, 4, 9):
        prefill.write_block(b, 16 * b)
    prefill.client.publish("req-p", [[3, 4, 9]])
    decode.client.pull("req-d", remote_agent_id=prefill_id, remote_address="", remote_request_id="req-p", local_blocks=[[10, 11, 0]], remote_blocks=[[3, 4, 9]])
    got = poll_until(decode.client, lambda f: "req-d" in f.recving)
    assert got.failed == {} and got.invalid_blocks == []
    for local, remote in ((10, 3), (11, 4), (0, 9)):
        assert decode.block(local) == prefill.block(remote), f"decode block {local} != prefill block {remote}"
    assert decode.block(10)[1] == bytes([49]) * BLOCK
    # The prefill side learns the blocks were read and reports them once.
    poll_until(prefill.client, lambda f: "req-p" in f.sending)
    assert prefill.client.poll().sending == set()


def test_release_and_lease_expiry_finish_a_published_request(pair):
    decode, prefill, prefill_id = pair
    prefill.client.publish("kept", [[1]], lease_ms=300)
    prefill.client.publish("released", [[2]])
    decode.client.release(remote_agent_id=prefill_id, remote_address="", remote_request_id="released")
    # Heartbeats keep "kept" past its 300 ms lease...
    for _ in range(5):
        decode.client.heartbeat(remote_agent_id=prefill_id, remote_address="", remote_request_ids=["kept"])
        time.sleep(0.1)
    got = poll_until(prefill.client, lambda f: "released" in f.sending)
    assert "kept" not in got.sending, "heartbeats extend the lease"
    # ...and without them it expires.
    poll_until(prefill.client, lambda f: "kept" in f.sending, timeout_s=5)


def test_bad_calls_are_refused_clearly_and_change_nothing(pair):
    decode, prefill, prefill_id = pair
    prefill.client.publish("p1", [[5]])

    def refused(code: grpc.StatusCode, text: str, call, *args, **kwargs):
        with pytest.raises(AgentError) as e:
            call(*args, **kwargs)
        assert e.value.code == code, str(e.value)
        assert text in str(e.value), str(e.value)

    pull = dict(remote_agent_id=prefill_id, remote_address="", remote_request_id="p1")
    refused(grpc.StatusCode.ALREADY_EXISTS, "already published", prefill.client.publish, "p1", [[6]])
    refused(grpc.StatusCode.INVALID_ARGUMENT, f"block {BLOCKS} of group 0 is out of range", prefill.client.publish, "p2", [[BLOCKS]])
    refused(grpc.StatusCode.FAILED_PRECONDITION, "Publish is a prefill agent's call", decode.client.publish, "p3", [[1]])
    refused(grpc.StatusCode.FAILED_PRECONDITION, "Pull is a decode agent's call", prefill.client.pull, "x", local_blocks=[[1]], remote_blocks=[[1]], **pull)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "2 block groups given", decode.client.pull, "x", local_blocks=[[1], [2]], remote_blocks=[[1]], **pull)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "out of range", decode.client.pull, "x", local_blocks=[[BLOCKS + 1]], remote_blocks=[[5]], **pull)
    refused(grpc.StatusCode.NOT_FOUND, "no connected prefill agent is named", decode.client.pull, "x", local_blocks=[[1]], remote_blocks=[[5]], remote_agent_id="nobody", remote_address="", remote_request_id="p1")
    refused(grpc.StatusCode.ALREADY_EXISTS, "attached this agent's region already", decode.attach)
    # A pull of what the prefill side does not hold (never published, expired,
    # or a block it did not publish) reads nothing.
    prefill.write_block(6, 99)
    prefill.client.publish("short", [[6]], lease_ms=100)
    time.sleep(0.3)
    before = decode.block(1)
    for remote_id, blocks, code, text in [
        ("never", [5], grpc.StatusCode.NOT_FOUND, '"never" is not published here'),
        ("short", [6], grpc.StatusCode.NOT_FOUND, '"short" is not published here'),
        ("p1", [6], grpc.StatusCode.INVALID_ARGUMENT, "block 6 is not among the blocks"),
    ]:
        args = dict(pull, remote_request_id=remote_id)
        refused(code, text, decode.client.pull, "x", local_blocks=[[1]], remote_blocks=[blocks], **args)
    assert decode.block(1) == before, "a refused pull wrote nothing"
    # A pull refused for its local blocks claims nothing: the short lease of
    # what it named still runs out.
    prefill.client.publish("brief", [[6]], lease_ms=300)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "out of range", decode.client.pull, "x", local_blocks=[[BLOCKS + 1]], remote_blocks=[[6]], **dict(pull, remote_request_id="brief"))
    poll_until(prefill.client, lambda f: "brief" in f.sending, timeout_s=5)
    # Nothing changed: p1 is still held and pulls byte for byte.
    prefill.write_block(5, 77)
    decode.client.pull("ok", local_blocks=[[7]], remote_blocks=[[5]], **pull)
    assert "ok" in poll_until(decode.client, lambda f: "ok" in f.recving).recving
    assert decode.block(7) == prefill.block(5)
    poll_until(prefill.client, lambda f: "p1" in f.sending)


def test_an_attach_the_agent_cannot_serve_is_refused_and_it_keeps_waiting(agents, tmp_path):
    eng = Engine(agents, tmp_path, "decode", 0)
    small = os.memfd_create("too-small")
    os.ftruncate(small, 4096)
    with pytest.raises(AgentError) as e:
        eng.client.attach_host_region(fd=small, region_bytes=eng.size, tensors=[eng.layout], engine_id="e", role="decode", model_hash="m")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "fewer than the region's" in str(e.value), str(e.value)
    with pytest.raises(AgentError) as e:
        eng.client.attach_host_region(fd=eng.fd, region_bytes=eng.size, tensors=[eng.layout], engine_id="e", role="prefill", model_hash="m")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "this is a decode agent" in str(e.value)
    with pytest.raises(AgentError) as e:
        send_fd(eng.socket + ".fd", "", eng.fd)
    assert "token length 0" in str(e.value)
    # The agent still waits, and takes a good region.
    agent_id, _ = eng.attach()
    assert agent_id
    eng.agent.event("ready")
    eng.client.close()


class Req:
    """The fields of vLLM's Request that the connector reads."""

    def __init__(self, request_id: str, prompt_len: int, params: dict | None):
        self.request_id = request_id
        self.prompt_token_ids = list(range(prompt_len))
        self.kv_transfer_params = params


def test_the_connectors_scheduler_and_worker_move_a_request_end_to_end(pair):
    """vLLM's call order on both sides, with kvrail's scheduler bookkeeping and
    worker driving the real agents: a prefill finishes and publishes, the proxy
    copies its kv_transfer_params, the decode side (holding the prompt's first
    block in its prefix cache) pulls the other blocks tail-aligned, and both
    sides see the request finish exactly once."""
    from kvrail_vllm.scheduler import KvrailScheduler
    from kvrail_vllm.worker import KvrailWorker

    decode, prefill, prefill_id = pair
    p_sched, d_sched = KvrailScheduler("producer", "engine-prefill"), KvrailScheduler("consumer", "engine-decode")
    p_work, d_work = KvrailWorker(prefill.client), KvrailWorker(decode.client)
    p_sched.set_agent(prefill_id, "")
    # Prefill: a 4-block prompt in blocks 20..23, finished normally.
    for i, b in enumerate((20, 21, 22, 23)):
        prefill.write_block(b, 40 + i)
    hold, params = p_sched.request_finished(Req("p-1", 64, {"do_remote_decode": True}), [20, 21, 22, 23], finished_normally=True)
    assert hold and params["remote_agent_id"] == prefill_id and params["remote_block_ids"] == [20, 21, 22, 23]
    p_work.run_step(p_sched.build_step())
    # Decode: 16 of 64 tokens are a local prefix hit, so 3 blocks to pull.
    req = Req("d-1", 64, dict(params))
    assert d_sched.num_new_matched_tokens(req, 16) == (48, True)
    d_sched.after_alloc(req, [5, 6, 7], 48)
    assert d_sched.num_new_matched_tokens(req, 16) == (0, False), "a request transfers once"
    plan = d_sched.build_step()
    assert [(p.local_blocks, p.remote_blocks) for p in plan.pulls] == [((5, 6, 7), (21, 22, 23))]
    assert d_work.run_step(plan) == set()
    deadline = time.monotonic() + 20
    recving: set[str] = set()
    while "d-1" not in recving and time.monotonic() < deadline:
        _, got, failed = d_work.results()
        assert failed == {}, failed
        recving |= got
        time.sleep(0.02)
    assert "d-1" in recving
    for local, remote in ((5, 21), (6, 22), (7, 23)):
        assert decode.block(local) == prefill.block(remote)
    d_sched.finished_recving({"d-1"})
    sending: set[str] = set()
    while "p-1" not in sending and time.monotonic() < deadline:
        sending |= p_work.results()[0]
        time.sleep(0.02)
    assert sending == {"p-1"}

    # A pull the agent refuses fails only that request, with its blocks invalid.
    bad = Req("d-2", 64, dict(params, remote_agent_id="gone", remote_request_id="p-1"))
    d_sched.after_alloc(bad, [8], 16)
    assert d_work.run_step(d_sched.build_step()) == {"d-2"}
    _, recv, failed = d_work.results()
    assert "d-2" in recv and "no connected prefill agent" in failed["d-2"]
    assert d_work.take_invalid_blocks() == {8}

    # Everything was reported: the next steps ask the agents nothing (they
    # are stopped, so a call would fail)...
    decode.agent.stop()
    prefill.agent.stop()
    assert d_work.results() == (set(), set(), {}) and p_work.results() == (set(), set(), {})
    # ...until something is outstanding again.
    d_sched.after_alloc(Req("d-3", 64, dict(params)), [9], 16)
    assert d_work.run_step(d_sched.build_step()) == {"d-3"}, "the pull fails: no agent"
    assert d_work.results()[2].keys() == {"d-3"}
    p_sched.request_finished(Req("p-2", 16, {"do_remote_decode": True}), [1], finished_normally=True)
    with pytest.raises(AgentError, match="publishing request 'p-2'"):
        p_work.run_step(p_sched.build_step())


def test_a_pull_dials_the_prefill_agent_its_params_name(agents, tmp_path):
    """No agent is told of the other at start: the decode agent dials the
    prefill agent at the address its kv_transfer_params carry, on the first
    pull, and later calls reuse that session."""
    decode = Engine(agents, tmp_path, "decode", 0)
    decode.attach()
    decode.agent.event("ready")
    prefill = Engine(agents, tmp_path, "prefill", 0)
    prefill_id, prefill_addr = prefill.attach()
    prefill.agent.event("ready")
    assert prefill_addr.startswith("127.0.0.1:")
    prefill.write_block(2, 9)
    prefill.client.publish("p", [[2]])
    prefill.client.publish("q", [[3]])
    decode.client.pull("d", remote_agent_id=prefill_id, remote_address=prefill_addr, remote_request_id="p", local_blocks=[[4]], remote_blocks=[[2]])
    poll_until(decode.client, lambda f: "d" in f.recving)
    assert decode.block(4) == prefill.block(2)
    decode.client.release(remote_agent_id=prefill_id, remote_address=prefill_addr, remote_request_id="q")
    poll_until(prefill.client, lambda f: {"p", "q"} <= f.sending)
    decode.client.close()
    prefill.client.close()


def test_the_worker_polls_a_waiting_request_less_often_as_it_ages(pair):
    """vLLM asks for results every step; the worker polls its agent at once
    for a new request, then only as the request ages by the backoff (5%),
    at least every 50 ms, and not at all once nothing is outstanding."""
    from kvrail_vllm.scheduler import Publish, StepPlan
    from kvrail_vllm.worker import KvrailWorker

    _, prefill, _ = pair
    now = [100.0]
    w = KvrailWorker(prefill.client, clock=lambda: now[0])
    assert w.results() == (set(), set(), {}) and w.polls == 0, "nothing outstanding"
    w.run_step(StepPlan(publishes=[Publish("aging", (1,), 200)]))
    steps = [(0.0, 1), (0.0005, 2), (0.1, 3), (0.104, 3), (0.1051, 4), (0.109, 4), (0.1104, 5), (5.0, 6), (5.04, 6), (5.051, 7)]
    for t, polls in steps:
        now[0] = 100.0 + t
        w.results()
        assert w.polls == polls, f"at {t} s after the publish"
    # The 200 ms lease runs out; the poll after it reports the request, and
    # then the worker asks nothing.
    time.sleep(0.3)
    now[0] = 105.2
    assert w.results()[0] == {"aging"} and w.polls == 8
    now[0] = 106.0
    w.results()
    assert w.polls == 8
    with pytest.raises(ValueError, match="0 to 1"):
        KvrailWorker(prefill.client, poll_backoff=2)
