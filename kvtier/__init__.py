"""kvtier: a tiered KV-cache block manager for LLM inference.

The control plane (hashing, pools, policies) imports no torch; the data plane
(storage, transfers, the `KvBlockManager` facade) is loaded lazily so that
`import kvtier` stays cheap and torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kvtier.manager import KvBlockManager

__all__ = ["KvBlockManager", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "KvBlockManager":
        from kvtier.manager import KvBlockManager

        return KvBlockManager
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
