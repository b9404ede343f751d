"""The scheduler side of kvrail's vLLM connector: bookkeeping only, no socket,
no vLLM import (docs/design/vllm-sidecar.md, sections 3 and 5).

It decides, per engine step, what each worker tells its agent: which finished
prefills to publish (prefill side), which requests to pull (or, in push mode,
to expect the prefill agent to write), release or keep alive (decode side),
and it writes the ``kv_transfer_params`` a prefill returns, which any
NIXL-style proxy copies verbatim into the decode request.

``transfer_mode`` (``kv_connector_extra_config``) is the decode side's choice:
``"pull"`` reads the published blocks, ``"push"`` tells the prefill agent where
to write them. A prefill engine publishes the same way in both modes.

Requests are duck-typed: ``request_id``, ``prompt_token_ids`` and
``kv_transfer_params`` (a dict or None), as vLLM's ``Request`` has them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LEASE_S = 30.0
"""How long a prefill agent holds published blocks unless told otherwise
(vLLM's ``kv_lease_duration`` default)."""

TRANSFER_MODES = ("pull", "push")


@dataclass(frozen=True)
class Remote:
    """The prefill agent that holds a request's blocks."""

    agent_id: str
    address: str


@dataclass(frozen=True)
class Pull:
    request_id: str
    remote: Remote
    remote_request_id: str
    local_blocks: tuple[int, ...]
    remote_blocks: tuple[int, ...]


@dataclass(frozen=True)
class Push:
    """Push mode: the prefill agent writes ``remote_blocks`` of its published
    ``remote_request_id`` into ``local_blocks``, within ``lease_ms``."""

    request_id: str
    remote: Remote
    remote_request_id: str
    local_blocks: tuple[int, ...]
    remote_blocks: tuple[int, ...]
    lease_ms: int


@dataclass(frozen=True)
class Publish:
    request_id: str
    blocks: tuple[int, ...]
    lease_ms: int


@dataclass
class StepPlan:
    """What the scheduler hands every worker for one step (vLLM ships it as the
    connector metadata)."""

    publishes: list[Publish] = field(default_factory=list)
    pulls: list[Pull] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    releases: list[tuple[Remote, str]] = field(default_factory=list)
    heartbeats: dict[Remote, list[str]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.publishes or self.pulls or self.pushes or self.releases or self.heartbeats)


def tail_aligned(local_blocks: list[int], remote_blocks: list[int]) -> list[int]:
    """The remote blocks that pair with ``local_blocks``: the decode side already
    holds the prompt's first blocks in its prefix cache, so its k uncached blocks
    take the last k of the prefill side's n (local i <- remote n - k + i)."""
    k = len(local_blocks)
    if k > len(remote_blocks):
        raise ValueError(f"{k} local blocks to fill but the prefill side holds only {len(remote_blocks)}")
    return remote_blocks[len(remote_blocks) - k :] if k else []


class KvrailScheduler:
    """One engine's scheduler-side state. ``role`` is ``"producer"``,
    ``"consumer"`` or ``"both"`` (vLLM's kv_role without the ``kv_`` prefix);
    ``transfer_mode`` is ``"pull"`` or ``"push"``."""

    def __init__(self, role: str, engine_id: str, lease_s: float = DEFAULT_LEASE_S, clock=time.monotonic, transfer_mode: str = "pull"):
        if role not in ("producer", "consumer", "both"):
            raise ValueError(f"kv_role must be kv_producer, kv_consumer or kv_both, not kv_{role}")
        if transfer_mode not in TRANSFER_MODES:
            raise ValueError(f"transfer_mode must be 'pull' or 'push', not {transfer_mode!r}")
        self.role = role
        self.transfer_mode = transfer_mode
        self.engine_id = engine_id
        self.lease_s = lease_s
        self._clock = clock
        self._agent: Remote | None = None
        self._plan = StepPlan()
        # Decode side: requests pulled or waiting to be, by id -> (remote, remote id).
        self._waiting: dict[str, tuple[Remote, str]] = {}
        self._last_heartbeat = clock()

    def set_agent(self, agent_id: str, address: str) -> None:
        """This engine's agent (from the workers' handshake metadata)."""
        self._agent = Remote(agent_id, address)

    # Decode side.

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_prefill"):
            return 0, False
        count = len(request.prompt_token_ids) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def after_alloc(self, request: Any, local_blocks: list[int], num_external_tokens: int) -> None:
        """Blocks were allocated for ``request``: pull into them (push mode: have
        the prefill agent write into them), or (a full prefix hit) only tell the
        prefill side it may free its blocks. Each request transfers once."""
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_prefill"):
            return
        remote = _remote_of(params)
        remote_id = params["remote_request_id"]
        params["do_remote_prefill"] = False
        if num_external_tokens == 0 or not local_blocks:
            self._plan.releases.append((remote, remote_id))
            return
        pairs = tail_aligned(list(local_blocks), list(params["remote_block_ids"]))
        if self.transfer_mode == "push":
            # No heartbeats: the prefill agent holds its blocks for the write
            # as soon as the order reaches it.
            lease_ms = int(self.lease_s * 1000)
            self._plan.pushes.append(Push(request.request_id, remote, remote_id, tuple(local_blocks), tuple(pairs), lease_ms))
            return
        self._plan.pulls.append(Pull(request.request_id, remote, remote_id, tuple(local_blocks), tuple(pairs)))
        self._waiting[request.request_id] = (remote, remote_id)

    def finished_recving(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._waiting.pop(rid, None)

    # Prefill side, and the end of every request.

    def request_finished(self, request: Any, block_ids: list[int], finished_normally: bool) -> tuple[bool, dict[str, Any] | None]:
        """Returns (hold the blocks until finished_sending, kv_transfer_params)."""
        params = request.kv_transfer_params or {}
        if params.get("do_remote_prefill"):
            # A decode request aborted before it was scheduled: free the
            # prefill side's blocks now.
            params["do_remote_prefill"] = False
            self._plan.releases.append((_remote_of(params), params["remote_request_id"]))
            return False, None
        if not params.get("do_remote_decode") or self.role == "consumer":
            return False, None
        if not finished_normally or not block_ids:
            return False, None
        if self._agent is None:
            raise RuntimeError("kvrail: no agent address for this engine yet (the workers' handshake metadata has not arrived)")
        self._plan.publishes.append(Publish(request.request_id, tuple(block_ids), int(self.lease_s * 1000)))
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(block_ids),
            "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id,
            "remote_agent_id": self._agent.agent_id,
            "remote_agent_address": self._agent.address,
            "remote_num_tokens": len(request.prompt_token_ids),
            "transfer_mode": self.transfer_mode,
        }

    def build_step(self) -> StepPlan:
        """What this step's workers do; heartbeats every lease/6 for requests
        still waiting."""
        plan, self._plan = self._plan, StepPlan()
        now = self._clock()
        if self._waiting and now - self._last_heartbeat >= self.lease_s / 6:
            self._last_heartbeat = now
            for remote, remote_id in self._waiting.values():
                plan.heartbeats.setdefault(remote, []).append(remote_id)
        return plan


def _remote_of(params: dict[str, Any]) -> Remote:
    try:
        return Remote(params["remote_agent_id"], params["remote_agent_address"])
    except KeyError as e:
        raise ValueError(f"kv_transfer_params lack {e.args[0]!r}: they must come from a kvrail prefill engine") from None
