"""A client of a kvrail agent's local API (the ``Sidecar`` service of
``proto/kvrail/v1/sidecar.proto``) over the agent's owner-only Unix socket,
with stubs generated from ``proto/`` (``kvrail_vllm._build``).

Every call has a deadline; a failure raises :class:`AgentError` with one line
saying what failed, against which socket, and the agent's own message.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from kvrail_vllm._pb.kvrail.v1 import kvrail_pb2 as pb
from kvrail_vllm._pb.kvrail.v1 import sidecar_pb2 as sc
from kvrail_vllm._pb.kvrail.v1 import sidecar_pb2_grpc as sc_grpc

DEFAULT_TIMEOUT_S = 10.0
"""Deadline of one call, seconds."""


class AgentError(RuntimeError):
    """A call to the agent failed; ``code`` is the gRPC status code."""

    def __init__(self, what: str, socket_path: str, code: grpc.StatusCode | None, detail: str):
        self.code = code
        name = code.name if code is not None else "ERROR"
        super().__init__(f"{what} on the kvrail agent at {socket_path}: {name}: {detail}")


@dataclass(frozen=True)
class Layout:
    """One KV cache tensor over the region (kvrail's ``BlockLayout`` plus a base
    offset): block ``b`` of layer ``l`` starts at
    ``offset + l * layer_stride + b * block_stride``."""

    block_bytes: int
    num_blocks: int
    num_layers: int
    block_stride: int
    layer_stride: int
    offset: int = 0
    group: int = 0

    def end(self) -> int:
        """One past the last byte any block of this tensor covers."""
        return self.offset + (self.num_layers - 1) * self.layer_stride + (self.num_blocks - 1) * self.block_stride + self.block_bytes

    def to_pb(self) -> sc.KvTensor:
        layout = pb.BlockLayout(
            block_bytes=self.block_bytes,
            num_blocks=self.num_blocks,
            num_layers=self.num_layers,
            block_stride=self.block_stride,
            layer_stride=self.layer_stride,
        )
        return sc.KvTensor(group=self.group, offset=self.offset, layout=layout)


@dataclass
class Finished:
    """What :meth:`SidecarClient.poll` returns: each id is reported once."""

    sending: set[str] = field(default_factory=set)
    recving: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    invalid_blocks: list[set[int]] = field(default_factory=list)


def send_fd(fd_socket_path: str, token: str, fd: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Sends ``fd`` to the agent's side socket with SCM_RIGHTS, named by the
    one-time ``token`` that :meth:`SidecarClient.attach_host_region` then
    passes in its AttachRegion. The agent answers one byte: 0 = taken."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(fd_socket_path)
            data = token.encode()
            s.sendmsg([len(data).to_bytes(2, "big") + data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            answer = s.recv(1024)
        except OSError as e:
            raise AgentError("sending the region's file descriptor", fd_socket_path, None, f"{e.strerror or e}") from e
    if answer[:1] != b"\x00":
        detail = answer[1:].decode(errors="replace") or "the agent closed the side socket without an answer"
        raise AgentError("sending the region's file descriptor", fd_socket_path, None, detail)


class SidecarClient:
    """One engine worker's connection to its kvrail agent."""

    def __init__(self, socket_path: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        # gRPC names a Unix socket's authority after its path, which is not a
        # valid HTTP/2 authority for the agent's server: name it localhost.
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket_path)}", options=[("grpc.default_authority", "localhost")])
        self._stub = sc_grpc.SidecarStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise AgentError(what, self.socket_path, e.code(), e.details() or "") from None

    def attach_host_region(self, *, fd: int, **region) -> tuple[str, str]:
        """Hands the agent a host region (``fd``, a memfd or shared-memory file of
        ``region_bytes``) and its tensors; returns the agent's ``(id, address)``
        for the other side's kv_transfer_params. ``region``: see :meth:`_attach`."""
        token = os.urandom(16).hex()
        send_fd(self.socket_path + ".fd", token, fd, self.timeout_s)
        return self._attach("attaching the region", source=sc.REGION_SOURCE_HOST_FD, fd_token=token, **region)

    def attach_cuda_region(self, *, ipc_handle: bytes, device: int, **region) -> tuple[str, str]:
        """Hands an agent started with ``--memory cuda-ipc`` the engine's GPU
        allocation: the 64-byte CUDA IPC handle of one cuMemAlloc allocation
        (``cuIpcGetMemHandle``) on ``device``, its tensors starting at offset 0."""
        return self._attach("attaching the GPU region", source=sc.REGION_SOURCE_CUDA_IPC, cuda_ipc_handle=ipc_handle, cuda_device=device, **region)

    def _attach(
        self,
        what: str,
        *,
        region_bytes: int,
        tensors: Sequence[Layout],
        engine_id: str,
        role: str,
        model_hash: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        pp_rank: int = 0,
        dp_rank: int = 0,
        **source,
    ) -> tuple[str, str]:
        req = sc.AttachRegionRequest(
            engine_id=engine_id,
            dp_rank=dp_rank,
            pp_rank=pp_rank,
            tp_rank=tp_rank,
            tp_size=tp_size,
            role=_role(role),
            model_hash=model_hash,
            region_bytes=region_bytes,
            tensors=[t.to_pb() for t in tensors],
            **source,
        )
        resp = self._call(what, self._stub.AttachRegion, req)
        return resp.agent_id, resp.agent_address

    def publish(self, request_id: str, blocks: Sequence[Iterable[int]], lease_ms: int = 0) -> None:
        req = sc.PublishRequest(request_id=request_id, blocks=_groups(blocks), lease_ms=lease_ms)
        self._call(f"publishing request {request_id!r}", self._stub.Publish, req)

    def pull(
        self,
        request_id: str,
        *,
        remote_agent_id: str,
        remote_address: str,
        remote_request_id: str,
        local_blocks: Sequence[Iterable[int]],
        remote_blocks: Sequence[Iterable[int]],
    ) -> None:
        req = sc.PullRequest(**_moved(request_id, remote_agent_id, remote_address, remote_request_id, local_blocks, remote_blocks))
        self._call(f"pulling request {request_id!r}", self._stub.Pull, req)

    def expect_push(
        self,
        request_id: str,
        *,
        remote_agent_id: str,
        remote_address: str,
        remote_request_id: str,
        local_blocks: Sequence[Iterable[int]],
        remote_blocks: Sequence[Iterable[int]],
        lease_ms: int = 0,
    ) -> None:
        """Push mode: ``local_blocks`` are where the prefill agent writes
        ``remote_blocks`` of its published ``remote_request_id``, within
        ``lease_ms`` (0: the agent's default); :meth:`poll` reports the end."""
        moved = _moved(request_id, remote_agent_id, remote_address, remote_request_id, local_blocks, remote_blocks)
        req = sc.ExpectPushRequest(**moved, lease_ms=lease_ms)
        self._call(f"expecting the push of request {request_id!r}", self._stub.ExpectPush, req)

    def release(self, *, remote_agent_id: str, remote_address: str, remote_request_id: str) -> None:
        req = sc.ReleaseRequest(remote_agent_id=remote_agent_id, remote_address=remote_address, remote_request_id=remote_request_id)
        self._call(f"releasing request {remote_request_id!r}", self._stub.Release, req)

    def heartbeat(self, *, remote_agent_id: str, remote_address: str, remote_request_ids: Iterable[str]) -> None:
        """Extends the leases of published requests on the prefill agent."""
        req = sc.HeartbeatRequest(remote_agent_id=remote_agent_id, remote_address=remote_address, remote_request_ids=list(remote_request_ids))
        self._call("sending heartbeats", self._stub.Heartbeat, req)

    def poll(self) -> Finished:
        resp = self._call("polling for finished requests", self._stub.Poll, sc.PollRequest())
        return Finished(
            sending=set(resp.finished_sending),
            recving=set(resp.finished_recving),
            failed={f.request_id: f.reason for f in resp.failed_recving},
            invalid_blocks=[set(g.ids) for g in resp.invalid_blocks],
        )


def _moved(
    request_id: str,
    remote_agent_id: str,
    remote_address: str,
    remote_request_id: str,
    local_blocks: Sequence[Iterable[int]],
    remote_blocks: Sequence[Iterable[int]],
) -> dict:
    """The fields a pull and a push request share."""
    return dict(
        request_id=request_id,
        remote_agent_id=remote_agent_id,
        remote_address=remote_address,
        remote_request_id=remote_request_id,
        local_blocks=_groups(local_blocks),
        remote_blocks=_groups(remote_blocks),
    )


def _groups(blocks: Sequence[Iterable[int]]) -> list[sc.BlockIds]:
    return [sc.BlockIds(ids=list(g)) for g in blocks]


def _role(role: str) -> int:
    roles = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE}
    if role not in roles:
        raise ValueError(f"role must be 'prefill' or 'decode', not {role!r}")
    return roles[role]
