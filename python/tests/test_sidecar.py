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

    def __init__(self, agents, tmp_path, role: str, offset: int, *extra: str, name: str | None = None, transport: str = "tcp"):
        name = name or role
        self.layout = Layout(**LAYOUT, offset=offset)
        self.fd = os.memfd_create(f"kv-{name}")
        self.size = self.layout.end()
        os.ftruncate(self.fd, self.size)
        self.socket = str(tmp_path / f"{name}.sock")
        self.agent = agents(role, "--region-from-client", "--local-socket", self.socket, "--transport", transport, *extra, name=name)
        waiting = self.agent.event("waiting_for_region")
        assert waiting["fd_socket"] == self.socket + ".fd"
        self.client = SidecarClient(self.socket)
        self.role = role

    def attach(self, model_hash: str = "model-a") -> tuple[str, str]:
        return self.client.attach_host_region(fd=self.fd, region_bytes=self.size, tensors=[self.layout], engine_id=f"engine-{self.role}", role=self.role, model_hash=model_hash)

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


# Push mode: the decode side names the blocks a published request lands in
# (ExpectPush), and the prefill agent writes them there.


def started_pair(agents, tmp_path, transport: str):
    """A decode and a prefill agent that know nothing of each other: the
    decode agent dials the prefill agent named by the push."""
    decode = Engine(agents, tmp_path, "decode", 4096, transport=transport)
    decode.attach()
    decode.agent.event("ready")
    prefill = Engine(agents, tmp_path, "prefill", 0, transport=transport)
    prefill_id, prefill_addr = prefill.attach()
    prefill.agent.event("ready")
    return decode, prefill, dict(remote_agent_id=prefill_id, remote_address=prefill_addr)


@pytest.mark.parametrize("transport", ["tcp", "sm"])
def test_a_pushed_request_lands_byte_for_byte_whether_it_is_published_before_or_after(agents, tmp_path, transport):
    decode, prefill, at = started_pair(agents, tmp_path, transport)
    # Published first (the usual order: the proxy forwards a finished prefill).
    for b in (3, 4, 9):
        prefill.write_block(b, 16 * b)
    prefill.client.publish("p-1", [[3, 4, 9]])
    decode.client.expect_push("d-1", remote_request_id="p-1", local_blocks=[[10, 11, 0]], remote_blocks=[[3, 4, 9]], **at)
    got = poll_until(decode.client, lambda f: "d-1" in f.recving)
    assert got.failed == {} and got.invalid_blocks == []
    for local, remote in ((10, 3), (11, 4), (0, 9)):
        assert decode.block(local) == prefill.block(remote), f"decode block {local} != prefill block {remote}"
    assert decode.block(11)[1] == bytes([65]) * BLOCK
    poll_until(prefill.client, lambda f: "p-1" in f.sending)
    # Expected first: the prefill agent waits for the publish, then writes.
    before = decode.block(20)
    decode.client.expect_push("d-2", remote_request_id="p-2", local_blocks=[[20, 21]], remote_blocks=[[5, 6]], lease_ms=10_000, **at)
    time.sleep(0.3)
    assert decode.client.poll().recving == set() and decode.block(20) == before, "nothing lands before the publish"
    prefill.write_block(5, 200)
    prefill.write_block(6, 201)
    prefill.client.publish("p-2", [[5, 6]])
    got = poll_until(decode.client, lambda f: "d-2" in f.recving)
    assert got.failed == {}
    assert decode.block(20) == prefill.block(5) and decode.block(21) == prefill.block(6)
    poll_until(prefill.client, lambda f: "p-2" in f.sending)
    assert prefill.client.poll().sending == set() and decode.client.poll().recving == set(), "each id is reported once"
    decode.client.close()
    prefill.client.close()


def test_bad_pushes_are_refused_write_nothing_and_the_agents_keep_serving(agents, tmp_path):
    decode, prefill, at = started_pair(agents, tmp_path, "tcp")
    prefill.write_block(5, 77)
    prefill.client.publish("p1", [[5]])

    def refused(code: grpc.StatusCode, text: str, call, *args, **kwargs):
        with pytest.raises(AgentError) as e:
            call(*args, **kwargs)
        assert e.value.code == code, str(e.value)
        assert text in str(e.value), str(e.value)

    push = dict(at, remote_request_id="p1")
    untouched = {b: decode.block(b) for b in (1, 2, 3, 12)}
    refused(grpc.StatusCode.FAILED_PRECONDITION, "ExpectPush is a decode agent's call", prefill.client.expect_push, "x", local_blocks=[[1]], remote_blocks=[[5]], **push)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "2 block groups given", decode.client.expect_push, "x", local_blocks=[[1], [2]], remote_blocks=[[5]], **push)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "out of range", decode.client.expect_push, "x", local_blocks=[[BLOCKS]], remote_blocks=[[5]], **push)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "out of range", decode.client.expect_push, "x", local_blocks=[[1]], remote_blocks=[[BLOCKS + 3]], **push)
    refused(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty", decode.client.expect_push, "", local_blocks=[[1]], remote_blocks=[[5]], **push)
    refused(grpc.StatusCode.NOT_FOUND, "no connected prefill agent is named", decode.client.expect_push, "x", local_blocks=[[1]], remote_blocks=[[5]], remote_agent_id="nobody", remote_address="", remote_request_id="p1")
    refused(grpc.StatusCode.UNAVAILABLE, "cannot dial the prefill agent at 127.0.0.1:1", decode.client.expect_push, "x", local_blocks=[[1]], remote_blocks=[[5]], remote_agent_id="", remote_address="127.0.0.1:1", remote_request_id="p1")
    # A block is expected by one request at a time: a second push into it is refused.
    decode.client.expect_push("holder", local_blocks=[[12]], remote_blocks=[[7]], lease_ms=60_000, **dict(at, remote_request_id="not-yet"))
    refused(grpc.StatusCode.FAILED_PRECONDITION, 'local block 12 is already expected by request "holder"', decode.client.expect_push, "x", local_blocks=[[2, 12]], remote_blocks=[[5, 5]], **push)
    refused(grpc.StatusCode.ALREADY_EXISTS, '"holder" is already expecting a push', decode.client.expect_push, "holder", local_blocks=[[3]], remote_blocks=[[5]], **push)
    # Refused by the prefill agent, which writes nothing: a block the request
    # did not publish, a request never published within the lease.
    decode.client.expect_push("wrong-block", local_blocks=[[1]], remote_blocks=[[6]], **push)
    decode.client.expect_push("never", local_blocks=[[3]], remote_blocks=[[5]], lease_ms=300, **dict(at, remote_request_id="never-published"))
    got = poll_until(decode.client, lambda f: {"wrong-block", "never"} <= f.recving, timeout_s=10)
    assert "block 6 is not among the blocks request \"p1\" published" in got.failed["wrong-block"], got.failed
    # Whichever ends it first: the prefill agent's answer (nothing published
    # under that id within the hold) or the decode side's own lease.
    never = got.failed["never"]
    assert "\"never-published\" is not published here" in never or "did not push it within its lease of 300 ms" in never, got.failed
    assert {1, 3} <= set().union(*got.invalid_blocks)
    assert {b: decode.block(b) for b in untouched} == untouched, "a refused push wrote nothing"
    # Both agents still serve, and the request the refusals named is intact.
    decode.client.expect_push("ok", local_blocks=[[2]], remote_blocks=[[5]], **push)
    assert "ok" not in poll_until(decode.client, lambda f: "ok" in f.recving).failed
    assert decode.block(2) == prefill.block(5)
    poll_until(prefill.client, lambda f: "p1" in f.sending)


def test_an_expected_push_not_written_in_its_lease_fails_and_nothing_lands_later(agents, tmp_path):
    decode, prefill, at = started_pair(agents, tmp_path, "tcp")
    before = decode.block(4)
    decode.client.expect_push("d", local_blocks=[[4]], remote_blocks=[[8]], lease_ms=400, **dict(at, remote_request_id="late"))
    started = time.monotonic()
    got = poll_until(decode.client, lambda f: "d" in f.recving, timeout_s=10)
    assert time.monotonic() - started >= 0.35, "not before its lease"
    reason = got.failed["d"]
    assert "not published here" in reason or "within its lease of 400 ms" in reason, reason
    assert got.invalid_blocks == [{4}]
    # The prefill engine publishes it after all: nothing is written into the
    # decode side's blocks, which it has freed; its own lease frees it.
    prefill.write_block(8, 5)
    prefill.client.publish("late", [[8]], lease_ms=500)
    poll_until(prefill.client, lambda f: "late" in f.sending, timeout_s=5)
    assert decode.block(4) == before
    # The block is free to expect again.
    decode.client.expect_push("d", local_blocks=[[4]], remote_blocks=[[8]], **dict(at, remote_request_id="again"))
    prefill.client.publish("again", [[8]])
    assert "d" not in poll_until(decode.client, lambda f: "d" in f.recving).failed
    assert decode.block(4) == prefill.block(8)


def test_a_decode_agent_killed_while_its_push_waits_fails_only_its_request(agents, tmp_path):
    """Two decode agents expect pushes from one prefill agent; one is killed
    (SIGKILL) before the prefill engine publishes. The other's request is
    written; the dead one's is not, and its blocks are freed by its lease."""
    prefill = Engine(agents, tmp_path, "prefill", 0)
    prefill_id, prefill_addr = prefill.attach()
    prefill.agent.event("ready")
    at = dict(remote_agent_id=prefill_id, remote_address=prefill_addr)
    doomed = Engine(agents, tmp_path, "decode", 0, name="doomed")
    doomed.attach()
    doomed.agent.event("ready")
    alive = Engine(agents, tmp_path, "decode", 0, name="alive")
    alive.attach()
    alive.agent.event("ready")
    doomed.client.expect_push("d1", local_blocks=[[1]], remote_blocks=[[1]], lease_ms=30_000, **dict(at, remote_request_id="p1"))
    alive.client.expect_push("d2", local_blocks=[[2]], remote_blocks=[[2]], lease_ms=30_000, **dict(at, remote_request_id="p2"))
    doomed.agent.proc.kill()
    doomed.agent.proc.wait(10)
    for b in (1, 2):
        prefill.write_block(b, 30 + b)
    published = time.monotonic()
    prefill.client.publish("p1", [[1]], lease_ms=2_000)
    prefill.client.publish("p2", [[2]], lease_ms=2_000)
    got = poll_until(alive.client, lambda f: "d2" in f.recving)
    assert got.failed == {} and alive.block(2) == prefill.block(2)
    early = poll_until(prefill.client, lambda f: "p2" in f.sending)
    assert "p1" not in early.sending, "the dead decode agent's request was not pushed"
    assert time.monotonic() - published < 1.8, "p2 was pushed, not left to its lease"
    # p1 is freed by its lease only.
    poll_until(prefill.client, lambda f: "p1" in f.sending, timeout_s=5)
    assert time.monotonic() - published >= 1.9
    alive.client.close()
    prefill.client.close()


def test_the_connectors_scheduler_and_worker_push_a_request_end_to_end(agents, tmp_path):
    """transfer_mode "push" on the decode side: the same call order as the
    pull test above, and the prefill agent writes into the blocks the decode
    scheduler allocated (tail-aligned to its prefix hit)."""
    from kvrail_vllm.scheduler import KvrailScheduler
    from kvrail_vllm.worker import KvrailWorker

    decode, prefill, at = started_pair(agents, tmp_path, "tcp")
    p_sched = KvrailScheduler("producer", "engine-prefill", transfer_mode="push")
    d_sched = KvrailScheduler("consumer", "engine-decode", transfer_mode="push")
    p_work, d_work = KvrailWorker(prefill.client), KvrailWorker(decode.client)
    p_sched.set_agent(at["remote_agent_id"], at["remote_address"])
    for i, b in enumerate((20, 21, 22, 23)):
        prefill.write_block(b, 90 + i)
    hold, params = p_sched.request_finished(Req("p-1", 64, {"do_remote_decode": True}), [20, 21, 22, 23], finished_normally=True)
    assert hold and params["transfer_mode"] == "push"
    # The decode side's push may reach the prefill agent before its publish.
    req = Req("d-1", 64, dict(params))
    assert d_sched.num_new_matched_tokens(req, 16) == (48, True)
    d_sched.after_alloc(req, [5, 6, 7], 48)
    plan = d_sched.build_step()
    assert plan.pulls == [] and [(p.local_blocks, p.remote_blocks) for p in plan.pushes] == [((5, 6, 7), (21, 22, 23))]
    assert d_work.run_step(plan) == set()
    p_work.run_step(p_sched.build_step())
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
    sending: set[str] = set()
    while "p-1" not in sending and time.monotonic() < deadline:
        sending |= p_work.results()[0]
        time.sleep(0.02)
    assert sending == {"p-1"}
    # A push the agent refuses fails only that request, with its blocks invalid.
    d_sched.after_alloc(Req("d-2", 64, dict(params, remote_agent_id="gone")), [8], 16)
    assert d_work.run_step(d_sched.build_step()) == {"d-2"}
    _, recv, failed = d_work.results()
    assert "d-2" in recv and 'not "gone": fix the request' in failed["d-2"]
    assert d_work.take_invalid_blocks() == {8}


def test_engines_of_different_models_refuse_each_other_at_handshake(agents, tmp_path):
    """The model hash each engine attached with travels in the handshake: a
    decode agent never reads blocks of another model's KV cache, and says
    which models differ."""
    decode = Engine(agents, tmp_path, "decode", 0)
    decode.attach(model_hash="llama-8b:bf16")
    decode.agent.event("ready")
    prefill = Engine(agents, tmp_path, "prefill", 0)
    prefill_id, prefill_addr = prefill.attach(model_hash="qwen-7b:fp8")
    prefill.agent.event("ready")
    prefill.write_block(2, 9)
    before = decode.block(4)
    prefill.client.publish("p", [[2]])
    try:
        decode.client.pull("d", remote_agent_id=prefill_id, remote_address=prefill_addr, remote_request_id="p", local_blocks=[[4]], remote_blocks=[[2]])
        why = poll_until(decode.client, lambda f: "d" in f.failed).failed["d"]
    except AgentError as e:
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
        why = str(e)
    assert "llama-8b:bf16" in why and "qwen-7b:fp8" in why, why
    assert decode.block(4) == before, "nothing was read"
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
