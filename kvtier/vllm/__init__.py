"""kvtier's vLLM V1 integration: ``KvTierConnector`` (``kv_connector_module_path="kvtier.vllm"``).

The connector (and with it vLLM and torch) is imported lazily, so the torch-free scheduler half
(``kvtier.vllm.scheduler``) can be imported and tested without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.vllm.connector import KvTierConnector

__all__ = ["KvTierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvTierConnector":
        from kvtier.vllm.connector import KvTierConnector

        return KvTierConnector
    raise AttributeError(f"module 'kvtier.vllm' has no attribute {name!r}")
