"""kvrail's scheduler-side bookkeeping, on its own (no agent, no vLLM)."""

from __future__ import annotations

import pytest

from kvrail_vllm.scheduler import KvrailScheduler, Remote, tail_aligned


class Req:
    def __init__(self, request_id: str, prompt_len: int, params: dict | None):
        self.request_id = request_id
        self.prompt_token_ids = list(range(prompt_len))
        self.kv_transfer_params = params


PARAMS = {"do_remote_prefill": True, "remote_agent_id": "p", "remote_agent_address": "10.0.0.1:7000", "remote_request_id": "r", "remote_block_ids": [1, 2, 3, 4]}


def test_tail_alignment_pairs_local_blocks_with_the_last_remote_ones():
    assert tail_aligned([7, 8], [1, 2, 3, 4]) == [3, 4]
    assert tail_aligned([], [1, 2]) == []
    assert tail_aligned([5, 6, 7, 8], [1, 2, 3, 4]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="holds only 2"):
        tail_aligned([1, 2, 3], [1, 2])


def test_a_full_prefix_hit_or_an_abort_only_releases():
    s = KvrailScheduler("consumer", "d")
    s.after_alloc(Req("a", 64, dict(PARAMS)), [], 0)
    aborted = Req("b", 64, dict(PARAMS, remote_request_id="rb"))
    assert s.request_finished(aborted, [], finished_normally=False) == (False, None)
    plan = s.build_step()
    assert plan.pulls == [] and plan.releases == [(Remote("p", "10.0.0.1:7000"), "r"), (Remote("p", "10.0.0.1:7000"), "rb")]
    assert s.build_step().is_empty(), "each is planned once"


def test_heartbeats_go_every_sixth_of_the_lease_while_a_pull_waits():
    now = [0.0]
    s = KvrailScheduler("consumer", "d", lease_s=6.0, clock=lambda: now[0])
    s.after_alloc(Req("a", 64, dict(PARAMS)), [9], 16)
    assert s.build_step().heartbeats == {}
    now[0] = 1.0
    assert s.build_step().heartbeats == {Remote("p", "10.0.0.1:7000"): ["r"]}
    now[0] = 1.5
    assert s.build_step().heartbeats == {}
    s.finished_recving({"a"})
    now[0] = 3.0
    assert s.build_step().heartbeats == {}, "no heartbeats once the pull finished"


def test_the_prefill_side_publishes_only_normal_finishes_of_remote_decode_requests():
    s = KvrailScheduler("producer", "p", lease_s=30)
    with pytest.raises(RuntimeError, match="no agent address"):
        s.request_finished(Req("x", 8, {"do_remote_decode": True}), [1], finished_normally=True)
    s.set_agent("agent-p", "h:1")
    assert s.request_finished(Req("plain", 8, None), [1], finished_normally=True) == (False, None)
    assert s.request_finished(Req("aborted", 8, {"do_remote_decode": True}), [1], finished_normally=False) == (False, None)
    hold, params = s.request_finished(Req("ok", 8, {"do_remote_decode": True}), [4, 5], finished_normally=True)
    assert hold and params["remote_agent_address"] == "h:1" and params["remote_request_id"] == "ok"
    (pub,) = s.build_step().publishes
    assert (pub.request_id, pub.blocks, pub.lease_ms) == ("ok", (4, 5), 30_000)


def test_params_from_elsewhere_are_refused_clearly():
    s = KvrailScheduler("consumer", "d")
    with pytest.raises(ValueError, match="'remote_agent_id'.*kvrail prefill engine"):
        s.after_alloc(Req("a", 8, {"do_remote_prefill": True, "remote_request_id": "r"}), [1], 8)
    with pytest.raises(ValueError, match="kv_role must be"):
        KvrailScheduler("decoder", "d")


def test_push_mode_plans_a_tail_aligned_push_without_heartbeats():
    now = [0.0]
    s = KvrailScheduler("consumer", "d", lease_s=6.0, clock=lambda: now[0], transfer_mode="push")
    req = Req("a", 64, dict(PARAMS))
    assert s.num_new_matched_tokens(req, 16) == (48, True)
    s.after_alloc(req, [7, 8, 9], 48)
    assert s.num_new_matched_tokens(req, 16) == (0, False), "a request transfers once"
    now[0] = 1.0
    plan = s.build_step()
    assert plan.pulls == [] and plan.heartbeats == {}
    (push,) = plan.pushes
    assert (push.request_id, push.remote, push.remote_request_id) == ("a", Remote("p", "10.0.0.1:7000"), "r")
    assert (push.local_blocks, push.remote_blocks, push.lease_ms) == ((7, 8, 9), (2, 3, 4), 6000)
    now[0] = 2.0
    assert s.build_step().is_empty(), "planned once, and the prefill agent needs no heartbeat for it"
    # A full prefix hit or an abort is a release in push mode too.
    s.after_alloc(Req("b", 64, dict(PARAMS, remote_request_id="rb")), [], 0)
    plan = s.build_step()
    assert plan.pushes == [] and plan.releases == [(Remote("p", "10.0.0.1:7000"), "rb")]
    with pytest.raises(ValueError, match="holds only 4"):
        s.after_alloc(Req("c", 128, dict(PARAMS)), [1, 2, 3, 4, 5], 80)


def test_push_mode_is_named_in_the_prefill_params_and_checked():
    s = KvrailScheduler("producer", "p", transfer_mode="push")
    s.set_agent("agent-p", "h:1")
    hold, params = s.request_finished(Req("ok", 8, {"do_remote_decode": True}), [4], finished_normally=True)
    assert hold and params["transfer_mode"] == "push"
    (pub,) = s.build_step().publishes
    assert pub.blocks == (4,), "a prefill engine publishes the same way in both modes"
    with pytest.raises(ValueError, match="transfer_mode must be 'pull' or 'push', not 'write'"):
        KvrailScheduler("consumer", "d", transfer_mode="write")
