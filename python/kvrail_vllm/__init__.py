"""kvrail for vLLM: the pieces that let a vLLM worker hand its KV cache to a local
kvrail agent (docs/design/vllm-sidecar.md).

Today this package holds only the conformance checker (``kvrail_vllm.conformance``),
which checks a connector against the pinned vLLM's ``KVConnectorBase_V1`` by
parsing its source. Importing the package starts nothing and imports neither vLLM
nor torch.
"""

PINNED_VLLM_VERSION = "0.34.0"
"""The vLLM release kvrail's connector is written against (docs/design/vllm-sidecar.md)."""

__all__ = ["PINNED_VLLM_VERSION"]
