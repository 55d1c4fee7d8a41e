"""Which tunnel serves which subdomain, who may take a name, and how many tunnels anyone holds.

The rules (docs/protocol.md, "Names and ownership"):

- A name held by a live tunnel: the same owner (the same token) takes it over
  at once, evicting its stale socket; any other owner is refused (4003).
- A name whose tunnel dropped stays reserved for its last owner for `grace`
  seconds, so that neither a crash nor a relay restart hands a URL to whoever
  registers first: the owner takes it back at once, others are refused (4003)
  unless their grant names it exactly (an explicit assignment by the static
  tokens or the auth provider beats a memory of who held it last).
- Caps: tunnels per owner, per peer address and in all (4008).  Taking over
  one's own name is never refused by a cap: it adds no tunnel.
- Removal is by identity, so a stale socket's cleanup never deletes the
  registration that replaced it.

The registry in memory is the only source of truth for routing and for these
decisions.  A `ReservationStore` (optional) is told every change so that the
reservations survive a restart; until the stored ones are `restore`d, claims
must wait (`when_restored`), or a stranger could take a name in the first
milliseconds after a restart.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.reservations import ReservationStore, Row
from mcpr.relay.tunnels.contract import Tunnel

if TYPE_CHECKING:
    from mcpr.relay.settings import RelaySettings

log = Logger()

IN_USE = "subdomain in use by another token"
TOO_MANY_FOR_TOKEN = "too many tunnels for this token"
TOO_MANY_FROM_ADDRESS = "too many tunnels from this address"
RELAY_FULL = "relay full: too many tunnels"


def reserved(seconds_left: int) -> Refused:
    """The refusal of a name kept for its last owner (here, or cluster-wide in Redis)."""
    return Refused(CloseCode.IN_USE, f"subdomain reserved for another token for {seconds_left} s")


class Reservation(NamedTuple):
    owner: str
    expires: float


class Registry:
    def __init__(self, clock: IReactorTime, *, max_per_owner: int, max_per_peer: int, max_tunnels: int,
                 grace: float, max_reservations: int, store: ReservationStore | None = None) -> None:
        self._clock = clock
        self._tunnels: dict[str, Tunnel] = {}
        self._peer_of: dict[str, str] = {}
        self._per_owner: dict[str, int] = {}
        self._per_peer: dict[str, int] = {}
        # Soonest to expire first: every reservation lasts `grace`, so insertion order is expiry
        # order, and pruning and making room only ever look at the front.
        self._reserved: dict[str, Reservation] = {}
        self._max_per_owner = max_per_owner
        self._max_per_peer = max_per_peer
        self._max_tunnels = max_tunnels
        self._grace = grace
        self._max_reservations = max_reservations
        self._store = store
        self.restored = store is None
        self._waiting: list[Deferred[None]] = []

    @classmethod
    def for_settings(cls, clock: IReactorTime, settings: RelaySettings,
                     store: ReservationStore | None = None) -> Registry:
        return cls(clock, max_per_owner=settings.max_tunnels_per_token, max_per_peer=settings.max_tunnels_per_ip,
                   max_tunnels=settings.max_tunnels, grace=settings.reservation_grace,
                   max_reservations=settings.max_reservations, store=store)

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def get(self, subdomain: str) -> Tunnel | None:
        return self._tunnels.get(subdomain)

    def reservation(self, subdomain: str) -> Reservation | None:
        """Who `subdomain` is kept for, if its tunnel dropped less than `grace` ago."""
        reservation = self._reserved.get(subdomain)
        if reservation is None or reservation.expires <= self._clock.seconds():
            return None
        return reservation

    # -- claims

    def claim(self, tunnel: Tunnel, *, peer: str, assigned: bool = False) -> None:
        """Register `tunnel` under its subdomain, or raise `Refused` (4003, 4008).

        `peer` names the address it came from (for the per-address cap); `assigned`: the
        tunnel's grant names this subdomain exactly, which overrides a reservation."""
        name, owner = tunnel.subdomain, tunnel.owner
        current = self._tunnels.get(name)
        if current is tunnel:
            return
        self.admits(tunnel, peer=peer, assigned=assigned)
        if current is not None:
            self._drop(name, current)
        else:
            self._reserved.pop(name, None)
            if self._store is not None:
                self._store.held(name, owner)
        self._tunnels[name] = tunnel
        self._peer_of[name] = peer
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        if current is not None:
            current.evict()

    def admits(self, tunnel: Tunnel, *, peer: str, assigned: bool = False) -> None:
        """Raise the `Refused` that `claim` would raise, changing nothing else: a cluster node asks
        before it claims the name cluster-wide, so that a refusal here never leaves a claim there."""
        name, owner = tunnel.subdomain, tunnel.owner
        current = self._tunnels.get(name)
        if current is not None:
            if current.owner != owner:
                raise Refused(CloseCode.IN_USE, IN_USE)
            return
        self._prune()
        reservation = self.reservation(name)
        if reservation is not None and reservation.owner != owner and not assigned:
            left = math.ceil(reservation.expires - self._clock.seconds())
            raise reserved(left)
        self._check_caps(owner, peer)

    def _check_caps(self, owner: str, peer: str) -> None:
        if len(self._tunnels) >= self._max_tunnels:
            raise Refused(CloseCode.TOO_MANY, RELAY_FULL)
        if self._per_peer.get(peer, 0) >= self._max_per_peer:
            raise Refused(CloseCode.TOO_MANY, TOO_MANY_FROM_ADDRESS)
        if self._per_owner.get(owner, 0) >= self._max_per_owner:
            raise Refused(CloseCode.TOO_MANY, TOO_MANY_FOR_TOKEN)

    def _drop(self, name: str, tunnel: Tunnel) -> None:
        """Forget the live registration of `tunnel` (no reservation: the caller decides)."""
        del self._tunnels[name]
        _decrement(self._per_owner, tunnel.owner)
        _decrement(self._per_peer, self._peer_of.pop(name))

    def release(self, tunnel: Tunnel) -> bool:
        """Forget `tunnel`, unless its subdomain now belongs to a newer registration; the name
        stays reserved for its owner for `grace` seconds."""
        name = tunnel.subdomain
        if self._tunnels.get(name) is not tunnel:
            return False
        self._drop(name, tunnel)
        self._prune()
        self._make_room(1)
        expires = self._clock.seconds() + self._grace
        self._reserved[name] = Reservation(tunnel.owner, expires)
        if self._store is not None:
            self._store.reserved(name, tunnel.owner, expires)
        return True

    def revoke_all_but(self, owners: set[str]) -> list[Tunnel]:
        """Forget every tunnel and reservation of an owner not in `owners` (static tokens were
        removed); returns the tunnels, for the caller to close.  They leave no reservation."""
        for name, reservation in list(self._reserved.items()):
            if reservation.owner not in owners:
                self._forget(name)
        revoked = [t for t in self._tunnels.values() if t.owner not in owners]
        for tunnel in revoked:
            self._drop(tunnel.subdomain, tunnel)
            if self._store is not None:
                self._store.forgotten(tunnel.subdomain)
        return revoked

    def stop_recording(self) -> None:
        """Tell the store nothing more (the relay is stopping and closes every tunnel itself)."""
        self._store = None

    # -- reservations

    def _forget(self, name: str) -> None:
        del self._reserved[name]
        if self._store is not None:
            self._store.forgotten(name)

    def _prune(self) -> None:
        """Drop the reservations that expired (they are at the front)."""
        now = self._clock.seconds()
        while self._reserved:
            name, reservation = next(iter(self._reserved.items()))
            if reservation.expires > now:
                return
            self._forget(name)

    def _make_room(self, n: int) -> None:
        """At most `max_reservations`: the ones closest to expiry give way to `n` newer ones."""
        while self._reserved and len(self._reserved) + n > self._max_reservations:
            name = next(iter(self._reserved))
            log.warn("reservations: {max} names reserved, the reservation of {subdomain} ends early",
                     max=self._max_reservations, subdomain=name)
            self._forget(name)

    def restore(self, rows: Iterable[Row], keep: Callable[[str], bool] = lambda owner: True) -> None:
        """Take the reservations loaded from the store (soonest to expire first), except those of
        owners `keep` rejects, and let waiting claims go on."""
        now = self._clock.seconds()
        for name, owner, expires in rows:
            if name in self._tunnels:
                continue  # claimed already: its row says so
            if expires <= now or not keep(owner):
                if self._store is not None:
                    self._store.forgotten(name)
                continue
            self._reserved[name] = Reservation(owner, expires)
        self._make_room(0)
        log.info("reservations: {n} name(s) reserved for their last owner", n=len(self._reserved))
        self.restored = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_restored(self) -> Deferred[None]:
        """Fires once the stored reservations are known (at once if they are); cancellable."""
        d: Deferred[None] = Deferred(self._waiting.remove)
        if self.restored:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
