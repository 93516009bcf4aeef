"""`Lifecycle`: the one `with` protocol of every component that owns threads, sockets or streams.

kvtier's constructors have no side effects; `start()` acquires (threads, sockets, CUDA streams,
pinned memory) and `close()` releases. This mixin gives each such component the same context
manager, so `with X(...) as x:` always means start on entry and close on exit, whatever `start()`
returns.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Lifecycle:
    """Mixin for a component with `start()` and `close()`; subclasses define both."""

    def start(self) -> object:
        """Acquire what the component needs to run (overridden by every subclass)."""
        raise NotImplementedError(f"{type(self).__name__} does not define start()")

    def close(self) -> None:
        """Release what `start()` acquired (overridden by every subclass)."""
        raise NotImplementedError(f"{type(self).__name__} does not define close()")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
