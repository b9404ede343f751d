"""kvrail for vLLM: the pieces that let a vLLM worker hand its KV cache to a local
kvrail agent (docs/design/vllm-sidecar.md).

- ``kvrail_vllm.client``: a client of the agent's local ``Sidecar`` API (stubs
  generated from the repository's ``proto/`` by ``kvrail_vllm._build``).
- ``kvrail_vllm.scheduler`` and ``kvrail_vllm.worker``: the connector's two
  sides, with no vLLM import: the scheduler's per-step plan (publish, pull
  tail-aligned, release, heartbeats) and the worker that carries it out.
- ``kvrail_vllm.connector``: ``KvrailConnector``, vLLM's ``KVConnectorBase_V1``
  and ``SupportsHMA`` on top of them (imports vLLM and torch).
- ``kvrail_vllm.conformance``: checks a connector against the pinned vLLM's base
  class by parsing its source.

Importing the package starts nothing and imports neither vLLM nor torch.
"""

PINNED_VLLM_VERSION = "0.34.0"
"""The vLLM release kvrail's connector is written against (docs/design/vllm-sidecar.md)."""

__all__ = ["PINNED_VLLM_VERSION"]
