"""Which tunnel serves which subdomain.

Two rules keep URLs stable and safe: only the same owner (the same token) may
take over a subdomain, evicting its stale socket at once, and removal is by
identity, so a stale socket's cleanup never deletes the registration that
replaced it.
"""

from __future__ import annotations

from typing import Iterator

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.tunnels.contract import Tunnel


class Registry:
    def __init__(self, max_per_owner: int) -> None:
        self._tunnels: dict[str, Tunnel] = {}
        self._max = max_per_owner

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def get(self, subdomain: str) -> Tunnel | None:
        return self._tunnels.get(subdomain)

    def owned_by(self, owner: str) -> list[Tunnel]:
        return [t for t in self._tunnels.values() if t.owner == owner]

    def claim(self, tunnel: Tunnel) -> None:
        """Register `tunnel` under its subdomain, or raise `Refused` (4003, 4008)."""
        current = self._tunnels.get(tunnel.subdomain)
        if current is tunnel:
            return
        if current is not None and current.owner != tunnel.owner:
            raise Refused(CloseCode.IN_USE, "subdomain in use")
        if current is None and len(self.owned_by(tunnel.owner)) >= self._max:
            raise Refused(CloseCode.TOO_MANY, "too many tunnels")
        self._tunnels[tunnel.subdomain] = tunnel
        if current is not None:
            current.evict()

    def release(self, tunnel: Tunnel) -> bool:
        """Forget `tunnel`, unless its subdomain now belongs to a newer registration."""
        if self._tunnels.get(tunnel.subdomain) is tunnel:
            del self._tunnels[tunnel.subdomain]
            return True
        return False
