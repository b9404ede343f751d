"""``KvrailConnector``: vLLM's KV connector (``KVConnectorBase_V1``, pinned
release ``kvrail_vllm.PINNED_VLLM_VERSION``) on a local kvrail agent. Load it with

    --kv-transfer-config '{"kv_connector": "KvrailConnector",
        "kv_connector_module_path": "kvrail_vllm.connector",
        "kv_role": "kv_producer" | "kv_consumer",
        "kv_connector_extra_config": {"socket": "/run/kvrail/{rank}.sock",
                                      "transfer_mode": "pull" | "push"}}'

(optional there: ``"poll_backoff": 0.05``, see ``KvrailWorker``) with one agent
per rank started as ``kvrail prefill|decode --region-from-client
--local-socket /run/kvrail/RANK.sock``. The scheduler side is bookkeeping only
(``kvrail_vllm.scheduler``); the worker side shares vLLM's host KV cache with its
agent in place (torch's shared-memory file, sent once over the agent's side
socket) and drives it (``kvrail_vllm.worker``). This module imports vLLM and
torch: only vLLM imports it.

``transfer_mode`` (default ``"pull"``) is the decode side's: pull reads the
published blocks, push has the prefill agent write them into the blocks the
decode side allocated.

Scope today: host memory (CPU KV cache), one KV cache group, TP 1.
Anything else is refused at start with what is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.config.kv_transfer import KVCacheAccess
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.attention.backend import AttentionMetadata
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

from kvrail_vllm.client import SidecarClient
from kvrail_vllm.scheduler import DEFAULT_LEASE_S, KvrailScheduler, StepPlan
from kvrail_vllm.worker import DEFAULT_POLL_BACKOFF, KvrailWorker, LayerView, layout_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


@dataclass
class KvrailMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class KvrailHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once: the rank's agent."""

    agent_id: str
    agent_address: str


class KvrailConnector(KVConnectorBase_V1, SupportsHMA):
    @classmethod
    def kv_cache_access(cls, kv_transfer_config: "KVTransferConfig") -> KVCacheAccess:
        return KVCacheAccess.IN_PROCESS

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        kv_role = cfg.kv_role.removeprefix("kv_")
        self._engine_id = cfg.engine_id
        self._model_hash = _model_hash(vllm_config)
        self._kv_role = kv_role
        self._scheduler: KvrailScheduler | None = None
        self._worker: KvrailWorker | None = None
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("KvrailConnector serves tensor parallel size 1 for now")
        if role == KVConnectorRole.SCHEDULER:
            lease = float(cfg.get_from_extra_config("kv_lease_duration", DEFAULT_LEASE_S))
            mode = str(cfg.get_from_extra_config("transfer_mode", "pull"))
            self._scheduler = KvrailScheduler(kv_role, self._engine_id, lease_s=lease, transfer_mode=mode)
            agent = cfg.get_from_extra_config("agent", None)
            if agent:
                self._scheduler.set_agent(agent["id"], agent["address"])
        else:
            rank = vllm_config.parallel_config.rank
            socket = str(cfg.get_from_extra_config("socket", "/run/kvrail/{rank}.sock")).replace("{rank}", str(rank))
            backoff = float(cfg.get_from_extra_config("poll_backoff", DEFAULT_POLL_BACKOFF))
            self._worker = KvrailWorker(SidecarClient(socket), poll_backoff=backoff)

    # Scheduler side.

    def get_num_new_matched_tokens(
        self,
        request: "Request",
        num_computed_tokens: int,
    ) -> tuple[int | None, bool]:
        return self._sched().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        groups = blocks.get_unhashed_block_ids_all_groups() if num_external_tokens else [[]]
        if len(groups) != 1:
            raise ValueError(f"KvrailConnector maps one KV cache group; this model has {len(groups)}")
        self._sched().after_alloc(request, groups[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KvrailMetadata(plan=self._sched().build_step())

    def request_finished(
        self,
        request: "Request",
        block_ids: list[int],
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        normal = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
        return self._sched().request_finished(request, block_ids, finished_normally=normal)

    def request_finished_all_groups(
        self,
        request: "Request",
        block_ids: tuple[list[int], ...],
    ) -> tuple[bool, dict[str, Any] | None]:
        if len(block_ids) != 1:
            raise ValueError(f"KvrailConnector maps one KV cache group; this request has {len(block_ids)}")
        return self.request_finished(request, block_ids[0])

    def update_connector_output(self, connector_output: KVConnectorOutput):
        self._sched().finished_recving(set(connector_output.finished_recving or ()))

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        meta = metadata.get(0)
        if isinstance(meta, KvrailHandshakeMetadata):
            self._sched().set_agent(meta.agent_id, meta.agent_address)

    # Worker side.

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        tensors = list({t.data_ptr(): t for t in kv_caches.values()}.values())
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("KvrailConnector takes a host (CPU) KV cache for now; GPU regions come through CUDA IPC")
        storage = tensors[0].untyped_storage()
        if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
            raise ValueError("vLLM's KV caches are not views of one allocation; kvrail registers one region")
        base = storage.data_ptr()
        layers = [
            LayerView(offset=t.data_ptr() - base, num_blocks=t.shape[0], page_bytes=t[0].numel() * t.element_size(), block_stride=t.stride(0) * t.element_size())
            for t in tensors
        ]
        # Moves the storage into a shared-memory file in place (every view
        # follows) and gives its descriptor; a no-op if it is already shared.
        fd, size = storage._share_fd_cpu_()
        worker = self._work()
        worker.attach_host(fd=fd, region_bytes=size, layout=layout_of(layers), engine_id=self._engine_id, role=_agent_role(self._kv_role), model_hash=self._model_hash)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KvrailMetadata) and not meta.plan.is_empty():
            self._work().run_step(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: "AttentionMetadata",
        **kwargs: Any,
    ) -> None:
        return None

    def wait_for_save(self):
        return None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self._work().results()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=set(failed))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().take_invalid_blocks()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        w = self._work()
        if w.agent_id is None:
            return None
        return KvrailHandshakeMetadata(agent_id=w.agent_id, agent_address=w.agent_address or "")

    def shutdown(self):
        if self._worker is not None:
            self._worker.client.close()

    def _sched(self) -> KvrailScheduler:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side call on the worker's KvrailConnector")
        return self._scheduler

    def _work(self) -> KvrailWorker:
        if self._worker is None:
            raise RuntimeError("a worker-side call on the scheduler's KvrailConnector")
        return self._worker


def _agent_role(kv_role: str) -> str:
    if kv_role == "both":
        raise ValueError("KvrailConnector runs an engine as kv_producer or kv_consumer, not kv_both")
    return "prefill" if kv_role == "producer" else "decode"


def _model_hash(vllm_config: "VllmConfig") -> str:
    """What must match between prefill and decode engines."""
    m, c = vllm_config.model_config, vllm_config.cache_config
    text = f"{m.model}|{m.dtype}|{c.block_size}|{c.cache_dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]
