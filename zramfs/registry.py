"""Named backends (allocators, compressors), looked up and pinned in one step
(docs/design.md, hazard 5).

A backend in use cannot be unregistered: `pin` and `unregister` take the same lock, so no
caller can be handed a backend that is going away.

    reg = Registry("compressor")
    reg.register("lz4", LZ4)
    ops = reg.pin("lz4")        # NotRegistered if absent
    ...
    reg.unpin("lz4")
"""
from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class NotRegistered(LookupError):
    """No backend of that name."""


class InUse(RuntimeError):
    """The backend is pinned by a user and cannot be unregistered."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._entries: dict[str, T] = {}
        self._users: dict[str, int] = {}

    def register(self, name: str, backend: T) -> None:
        with self._lock:
            self._entries.setdefault(name, backend)
            self._users.setdefault(name, 0)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise NotRegistered(f"no {self.kind} named {name!r}")
            if self._users[name]:
                raise InUse(f"{self.kind} {name!r} is in use by {self._users[name]} user(s)")
            del self._entries[name]
            del self._users[name]

    def pin(self, name: str) -> T:
        with self._lock:
            if name not in self._entries:
                raise NotRegistered(f"no {self.kind} named {name!r}")
            self._users[name] += 1
            return self._entries[name]

    def unpin(self, name: str) -> None:
        with self._lock:
            self._users[name] -= 1

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        with self._lock:
            return list(self._entries)
