"""The worker side of kvrail's vLLM connector: one agent session per rank, over
the agent's local API (``kvrail_vllm.client``). It carries out the scheduler's
step plan (``kvrail_vllm.scheduler``) and gathers what finished.

No vLLM or torch import here: the connector (``kvrail_vllm.connector``) turns
vLLM's KV cache tensors into a :class:`~kvrail_vllm.client.Layout` with
:func:`layout_of` and hands the shared file to :meth:`KvrailWorker.attach_host`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvrail_vllm.client import Layout, SidecarClient
from kvrail_vllm.scheduler import StepPlan


@dataclass(frozen=True)
class LayerView:
    """Where one layer's KV cache lies in the shared buffer: its first byte's
    offset, the bytes of one block (page) and the distance between blocks."""

    offset: int
    num_blocks: int
    page_bytes: int
    block_stride: int


def layout_of(layers: Sequence[LayerView]) -> Layout:
    """The one kvrail layout covering every layer: all layers alike and evenly
    spaced (vLLM's one backing allocation, viewed per layer). Anything else is
    refused with what differs."""
    if not layers:
        raise ValueError("no KV cache layers to register")
    ordered = sorted(layers, key=lambda v: v.offset)
    first = ordered[0]
    for v in ordered[1:]:
        if (v.num_blocks, v.page_bytes, v.block_stride) != (first.num_blocks, first.page_bytes, first.block_stride):
            raise ValueError(f"KV cache layers differ in geometry ({first} vs {v}); kvrail maps one uniform region")
    stride = ordered[1].offset - first.offset if len(ordered) > 1 else 0
    for a, b in zip(ordered, ordered[1:]):
        if b.offset - a.offset != stride:
            raise ValueError(f"KV cache layers are not evenly spaced (at {a.offset} and {b.offset}, expected a stride of {stride})")
    return Layout(
        block_bytes=first.page_bytes,
        num_blocks=first.num_blocks,
        num_layers=len(ordered),
        block_stride=first.block_stride,
        layer_stride=stride,
        offset=first.offset,
    )


DEFAULT_POLL_BACKOFF = 0.05
"""A step polls the agent only once the newest request still to report has
waited this fraction longer than at the last poll (see :class:`KvrailWorker`)."""

MAX_POLL_INTERVAL_S = 0.05
"""Longest a worker with something to report goes without polling its agent."""


class KvrailWorker:
    """One rank's view of its agent.

    vLLM asks for results every engine step, and an idle engine waiting for
    KV steps back to back. Each Poll is a gRPC round trip (here ~150-250 us of
    the engine's CPU), so :meth:`results` asks the agent only when something
    is still to report (published or pulled), and then at most every
    ``poll_backoff`` times the age of the newest such request (capped at
    :data:`MAX_POLL_INTERVAL_S`): a new request is polled at once, one that
    has taken 100 ms is polled every 5 ms, so the backoff adds at most that
    fraction to when a request is seen to finish. ``poll_backoff=0`` polls
    every step while something is outstanding."""

    def __init__(self, client: SidecarClient, poll_backoff: float = DEFAULT_POLL_BACKOFF, clock=time.monotonic):
        if not 0 <= poll_backoff <= 1:
            raise ValueError(f"poll_backoff is a fraction of a request's age, 0 to 1, not {poll_backoff}")
        self.client = client
        self.agent_id: str | None = None
        self.agent_address: str | None = None
        self.poll_backoff = poll_backoff
        self._clock = clock
        self._invalid: set[int] = set()
        self._refused: dict[str, str] = {}
        # Requests the agent will report once, with when they started:
        # published (finished_sending) and pulled (finished_recving).
        self._sending: dict[str, float] = {}
        self._recving: dict[str, float] = {}
        self._last_poll = float("-inf")
        self.polls = 0
        """Poll calls made to the agent."""

    def attach_host(self, *, fd: int, region_bytes: int, layout: Layout, engine_id: str, role: str, model_hash: str, tp_rank: int = 0, tp_size: int = 1) -> tuple[str, str]:
        self.agent_id, self.agent_address = self.client.attach_host_region(
            fd=fd, region_bytes=region_bytes, tensors=[layout], engine_id=engine_id, role=role, model_hash=model_hash, tp_rank=tp_rank, tp_size=tp_size
        )
        return self.agent_id, self.agent_address

    def run_step(self, plan: StepPlan) -> set[str]:
        """Carries out one step's plan; returns the requests whose pull or push
        the agent refused at once (they are reported as failed by :meth:`results`)."""
        for p in plan.publishes:
            self.client.publish(p.request_id, [p.blocks], p.lease_ms)
            self._sending[p.request_id] = self._clock()
        for remote, remote_id in plan.releases:
            self.client.release(remote_agent_id=remote.agent_id, remote_address=remote.address, remote_request_id=remote_id)
        for remote, ids in plan.heartbeats.items():
            self.client.heartbeat(remote_agent_id=remote.agent_id, remote_address=remote.address, remote_request_ids=ids)
        refused: dict[str, str] = {}
        moves = [(p, self.client.pull, {}) for p in plan.pulls]
        moves += [(p, self.client.expect_push, {"lease_ms": p.lease_ms}) for p in plan.pushes]
        for p, call, extra in moves:
            try:
                call(
                    p.request_id,
                    remote_agent_id=p.remote.agent_id,
                    remote_address=p.remote.address,
                    remote_request_id=p.remote_request_id,
                    local_blocks=[p.local_blocks],
                    remote_blocks=[p.remote_blocks],
                    **extra,
                )
            except Exception as e:  # noqa: BLE001 - any refusal fails only this request
                refused[p.request_id] = str(e)
                self._invalid.update(p.local_blocks)
            else:
                self._recving[p.request_id] = self._clock()
        self._refused |= refused
        return set(refused)

    def results(self) -> tuple[set[str], set[str], dict[str, str]]:
        """(finished_sending, finished_recving, failed_recving with reasons);
        a failed receive is in finished_recving too, as vLLM requires. The
        agent is asked only when something is outstanding, with the backoff
        described on the class; otherwise nothing is reported this step."""
        refused, self._refused = self._refused, {}
        if not (self._sending or self._recving):
            return set(), set(refused), refused
        now = self._clock()
        newest = max(max(self._sending.values(), default=now - 1e9), max(self._recving.values(), default=now - 1e9))
        if now - self._last_poll < min(MAX_POLL_INTERVAL_S, self.poll_backoff * (self._last_poll - newest)):
            return set(), set(refused), refused
        f = self.client.poll()
        self._last_poll = now
        self.polls += 1
        for rid in f.sending:
            self._sending.pop(rid, None)
        for rid in f.recving:
            self._recving.pop(rid, None)
        failed = dict(f.failed) | refused
        for group in f.invalid_blocks:
            self._invalid.update(group)
        return f.sending, f.recving | set(failed), failed

    def take_invalid_blocks(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid
