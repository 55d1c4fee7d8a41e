"""This relay's part in a cluster: its claims in the shared directory, kept in step with its registry.

The local `Registry` still routes every request for the tunnels this node
holds and applies every local rule (caps, the reservations it saw).  What a
cluster adds is decided here:

- A claim asks the registry first (`admits`: the caps and rules of one node),
  then the `Directory` (is the name held or reserved anywhere else?), and only
  then registers the tunnel here, so neither side is left holding a claim the
  other refused.  The same owner on another node is evicted there (4002) at
  once through that node's internal listener; if that message is lost, the
  other node's heartbeat finds its claim superseded and evicts it anyway.
- A release gives the name back to the directory, where it stays reserved for
  its owner for the grace period, cluster-wide.
- A public request for a name this node does not hold is located in the
  directory and handed to the owner node (`PeerClient`), never further.

Redis being unreachable stops only what needs it: new registrations are
refused with 1013 (the gateway retries), requests for other nodes' tunnels get
503, and the tunnels held here go on being served.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mcpr.common.protocol import REGISTRY_UNAVAILABLE, CloseCode, Refused
from mcpr.relay.cluster.directory import Directory, DirectoryUnavailable, Placement
from mcpr.relay.cluster.peers import PeerClient
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import Tunnel

log = Logger()


# How long a node remembers which node holds another node's tunnel: a busy tunnel then costs one
# Redis round trip a second instead of one per request (a third of the forwarding node's CPU in
# bench/cluster.py), and a gateway that moved is found again within a second, at once when the
# old holder's answer shows it (`stale`).
LOCATION_TTL = 1.0
MAX_LOCATIONS = 10_000


class Locations:
    """Recent answers of the directory: name -> node URL, for `ttl` seconds, `limit` names at most
    (the oldest go first).  Only found names are kept: a name registered a moment ago is never
    hidden by a remembered "nowhere"."""

    def __init__(self, clock: IReactorTime, ttl: float = LOCATION_TTL, limit: int = MAX_LOCATIONS) -> None:
        self._clock = clock
        self._ttl = ttl
        self._limit = limit
        self._known: dict[str, tuple[str, float]] = {}

    def get(self, name: str) -> str | None:
        entry = self._known.get(name)
        if entry is None:
            return None
        if entry[1] <= self._clock.seconds():
            del self._known[name]
            return None
        return entry[0]

    def put(self, name: str, node: str) -> None:
        self._known.pop(name, None)
        self._known[name] = (node, self._clock.seconds() + self._ttl)
        while len(self._known) > self._limit:
            del self._known[next(iter(self._known))]

    def forget(self, name: str) -> None:
        self._known.pop(name, None)


class ClusterNode:
    """Claims, releases and evictions of one node; see the module docstring."""

    def __init__(self, node: str, registry: Registry, directory: Directory, peers: PeerClient,
                 clock: IReactorTime) -> None:
        self.node = node
        self._registry = registry
        self.directory = directory
        self.peers = peers
        self._held: dict[str, tuple[Tunnel, Placement]] = {}
        self._locations = Locations(clock)

    async def claim(self, tunnel: Tunnel, *, peer: str, assigned: bool) -> None:
        """Register `tunnel` here and in the directory, or raise `Refused` (4003, 4008, 1013)."""
        self._registry.admits(tunnel, peer=peer, assigned=assigned)
        try:
            claimed = await self.directory.claim(tunnel.subdomain, tunnel.owner, assigned=assigned)
        except DirectoryUnavailable as e:
            log.warn("cluster: cannot claim {subdomain} ({why}); registration refused with 1013",
                     subdomain=tunnel.subdomain, why=str(e))
            raise Refused(CloseCode.TRY_AGAIN_LATER, REGISTRY_UNAVAILABLE) from None
        try:
            self._registry.claim(tunnel, peer=peer, assigned=assigned)
        except Refused:
            # The registry changed while the directory answered (another registration took the
            # last place): the directory's claim is given back.
            self._release(claimed.placement)
            raise
        self._held[tunnel.subdomain] = (tunnel, claimed.placement)
        if claimed.previous is not None and claimed.previous != self.node:
            self.peers.evict(claimed.previous, tunnel.subdomain, claimed.placement.value)

    def abandon(self, tunnel: Tunnel) -> None:
        """A claimed tunnel whose socket closed before it was told: forget it like a release."""
        if self._registry.release(tunnel):
            self.released(tunnel)

    def released(self, tunnel: Tunnel) -> None:
        """`tunnel`'s socket closed: its claim goes back to the directory (reserved for its owner)."""
        entry = self._held.get(tunnel.subdomain)
        if entry is not None and entry[0] is tunnel:
            del self._held[tunnel.subdomain]
            self._release(entry[1])

    def _release(self, placement: Placement) -> None:
        """Fire and forget: `Directory.release` logs its own failures, and the TTL ends a claim that
        nobody refreshes anyway."""
        Deferred.fromCoroutine(self.directory.release(placement))

    async def leave(self) -> None:
        """The relay stops: every name it holds goes back to the directory, so that requests reaching
        other nodes stop being sent here and the gateways can take their names back elsewhere."""
        placements = [placement for _, placement in self._held.values()]
        self._held.clear()
        await DeferredList([Deferred.fromCoroutine(self.directory.release(p)) for p in placements])

    async def close(self) -> None:
        """After the tunnels closed: the connections to the other nodes and to Redis."""
        await self.peers.close()
        await self.directory.close()

    # -- what the heartbeat and the other nodes say

    def placements(self) -> Iterable[Placement]:
        return [placement for _, placement in self._held.values()]

    def lost(self, subdomain: str) -> None:
        """The directory says another node holds `subdomain` now: this node's tunnel of that name
        is a stale one of the same owner (the claim rules allow nothing else); it is evicted."""
        entry = self._held.pop(subdomain, None)
        if entry is not None:
            log.info("cluster: {subdomain} is held by another node now; evicting it here", subdomain=subdomain)
            entry[0].evict()

    def evict(self, subdomain: str, value: str) -> None:
        """Another node claimed `subdomain` (its claim is `value`): evict ours, unless it is that claim."""
        entry = self._held.get(subdomain)
        if entry is not None and entry[1].value != value:
            self.lost(subdomain)

    async def locate(self, subdomain: str) -> str | None:
        """The node URL holding `subdomain` elsewhere, None if no node does (raises
        DirectoryUnavailable).  A placement naming this node is stale (the tunnel is gone here)."""
        node = self._locations.get(subdomain)
        if node is not None:
            return node
        placement = await self.directory.locate(subdomain)
        if placement is None or placement.node == self.node:
            return None
        self._locations.put(subdomain, placement.node)
        return placement.node

    def stale(self, subdomain: str) -> None:
        """A forwarded request for `subdomain` failed or was answered 502 (perhaps "tunnel not
        found": its gateway moved): the next one asks the directory again."""
        self._locations.forget(subdomain)
