"""`/_tunnel/register`: the WebSocket on which gateways claim a subdomain (docs/protocol.md, "Registration").

The token travels in the first message, never in the URL (URLs end up in
access logs).  Until a registration completes the socket may only carry the
registration exchange, and only for `registration_timeout` seconds.  Each
address may start `registration_rate` registrations per minute after a burst
(`RegistrationRate`): a stranger cannot churn through names, reservations or
auth-provider calls.  The protocol gets what it needs from its own factory:
the registry, the authenticator, the rate limit, an observer of outcomes and
a handful of settings.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Protocol, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode, Refused, fit_reason
from mcpr.common.web import TrustedProxies, peer_key
from mcpr.relay.auth import Authenticator, Grant, authorize
from mcpr.relay.cluster.node import ClusterNode
from mcpr.relay.identity import token_hint
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import Tunnel
from mcpr.relay.tunnels.guard import ControlBudget, Outbound, TunnelLimits
from mcpr.relay.tunnels.h2 import H2Tunnel
from mcpr.relay.tunnels.legacy import LegacyTunnel
from mcpr.relay.tunnels.pool import PoolObserver, SocketPool


class RegistrationObserver(PoolObserver, Protocol):
    """Told how each registration socket fares (metrics and logs), and of its pooled sockets."""

    def registered(self, tunnel: Tunnel, hint: str, peer: str | None, url: str) -> None: ...

    def refused(self, code: int, reason: str, hint: str | None, peer: str | None) -> None: ...

    def unregistered(self, tunnel: Tunnel, released: bool) -> None:
        """The socket of a registered tunnel closed; `released`: it still held its subdomain."""


RATE_LIMITED = "too many registrations from this address, retry later"

# The rate limit remembers this many addresses at most; beyond, the least recently seen is
# forgotten (it starts again with a full burst).  Bounds the relay's memory whatever the number
# of addresses a flood comes from.
MAX_RATE_ADDRESSES = 65536


def address_key(address: object, forwarded_for: str | None = None,
                trusted: TrustedProxies | None = None) -> str:
    """What a registration's limits count against: the same key as the public front's per-peer
    cap (an IPv4 address, or an IPv6 /64); "local" for a socket without an IP address.  Behind
    a trusted front proxy, the client its `X-Forwarded-For` names last (the proxy's own entry)."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "local"
    if forwarded_for and trusted and host in trusted:
        client = forwarded_for.rsplit(",", 1)[-1].strip()
        if client:
            host = client
    return peer_key(host)


class Admission(enum.Enum):
    OK = enum.auto()
    REFUSED = enum.auto()        # the first refusal since this address was last admitted
    REFUSED_AGAIN = enum.auto()  # refused again: not worth another log line


class _Bucket:
    __slots__ = ("tokens", "at", "refusing")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at
        self.refusing = False


class RegistrationRate:
    """A token bucket per address: `burst` registrations at once, then `per_minute`.

    Buckets are kept least recently used first, so the ones that have filled up
    again (and mean nothing any more) are dropped from the front as new ones
    come, and at most `max_addresses` are kept.
    """

    def __init__(self, clock: IReactorTime, *, per_minute: int, burst: int,
                 max_addresses: int = MAX_RATE_ADDRESSES) -> None:
        self._clock = clock
        self._rate = per_minute / 60
        self._burst = float(burst)
        self._max = max_addresses
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, key: str) -> Admission:
        now = self._clock.seconds()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
        else:
            bucket.tokens = self._level(bucket, now)
            bucket.at = now
        self._buckets[key] = bucket
        self._trim(now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            bucket.refusing = False
            return Admission.OK
        if bucket.refusing:
            return Admission.REFUSED_AGAIN
        bucket.refusing = True
        return Admission.REFUSED

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)

    def _trim(self, now: float) -> None:
        while len(self._buckets) > 1:
            key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= self._max and self._level(oldest, now) < self._burst:
                return
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class _State(enum.Enum):
    CONNECTING = enum.auto()      # the WebSocket handshake
    HELLO = enum.auto()           # waiting for the first message: token, maybe a subdomain
    AUTHENTICATING = enum.auto()  # the token is being checked (the provider may take a while)
    PICK = enum.auto()            # subdomains were offered; waiting for the gateway's pick
    CLAIMING = enum.auto()        # a subdomain is decided; claiming it in the registry
    REGISTERED = enum.auto()      # a tunnel: messages now belong to it
    REFUSED = enum.auto()         # closing with a refusal
    CLOSED = enum.auto()


class RegistrationProtocol(WebSocketServerProtocol):
    _log = Logger()  # autobahn owns self.log
    factory: RegistrationFactory

    def __init__(self) -> None:
        super().__init__()
        self.tunnel: Tunnel | None = None
        self._h2 = False
        self._state = _State.CONNECTING
        self._timer: IDelayedCall | None = None
        self._peer: str | None = None
        self._address = "local"
        self._token: str | None = None
        self._grant: Grant | None = None
        self._hello_done: Deferred[None] | None = None
        self._budget: ControlBudget | None = None  # set when the socket opens (_guard_socket)
        self._outbound: Outbound | None = None
        self._pool_asked = 0  # pooled sockets the gateway's hello asked for

    # -- autobahn callbacks

    def onConnect(self, request: Any) -> str | None:
        """Gateways that offer `mcpr-tunnel.h2` get HTTP/2 streams; others the legacy JSON protocol."""
        self._peer = request.peer
        assert self.transport is not None
        self._address = address_key(self.transport.getPeer(), request.headers.get("x-forwarded-for"),
                                    self.factory.trusted)
        if wire.SUBPROTOCOL in request.protocols:
            self._h2 = True
            return wire.SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        admission = self.factory.rate.admit(self._address)
        if admission is Admission.REFUSED_AGAIN:
            self._state = _State.REFUSED
            self.close_with(CloseCode.TOO_MANY, RATE_LIMITED)
            return
        if admission is Admission.REFUSED:
            self._refuse(CloseCode.TOO_MANY, RATE_LIMITED)
            return
        self._guard_socket()
        self._state = _State.HELLO
        self._timer = self.factory.reactor.callLater(self.factory.registration_timeout, self._registration_timeout)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.tunnel is not None:
            self._tunnel_message(payload, isBinary)
            return
        if self._state not in (_State.HELLO, _State.PICK) or isBinary:
            self._refuse(CloseCode.POLICY, "unexpected message during registration")
            return
        try:
            message = json.loads(payload)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            self._refuse(CloseCode.POLICY, "registration must be a JSON object")
            return
        subdomain = message.get("subdomain") or None  # original clients may send ""
        if subdomain is not None and not isinstance(subdomain, str):
            self._refuse(CloseCode.INVALID_SUBDOMAIN, "invalid subdomain")
            return
        if self._state is _State.HELLO:
            token = message.get("token")
            pool = message.get("pool")
            if isinstance(pool, int) and not isinstance(pool, bool) and pool > 0:
                self._pool_asked = min(pool, wire.MAX_POOL)
            self._state = _State.AUTHENTICATING
            self._hello_done = Deferred.fromCoroutine(self._hello(token if isinstance(token, str) else "", subdomain))
            self._hello_done.addErrback(self._crashed)
        else:
            self._state = _State.CLAIMING
            self._decide(subdomain, offer_allowed=False)

    def onPing(self, payload: bytes) -> None:
        """Autobahn answers every ping with a pong: pings draw on the socket's control budget like
        HTTP/2 control frames, and a gateway that is not reading gets no pong to pile up."""
        if self._budget is not None and not self._budget.spend():
            self._log.warn("closing a gateway socket from {peer}: WebSocket ping flood", peer=self._peer)
            self._close(CloseCode.POLICY, "ping flood")
            return
        if self._outbound is None or not self._outbound.full:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._hello_done is not None and not self._hello_done.called:
            # Gone (or timed out) before the token was checked: drop the auth provider's request
            # now (D11) rather than let a hang-up cost a whole provider call.
            self._hello_done.cancel()
        self._state = _State.CLOSED
        self._cancel_timer()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            self.factory.observer.unregistered(tunnel, self.factory.registry.release(tunnel))
            if self.factory.cluster is not None:
                self.factory.cluster.released(tunnel)
            tunnel.closed()

    # -- registration

    async def _hello(self, token: str, subdomain: str | None) -> None:
        try:
            grant = await self.factory.auth.authenticate(token, subdomain)
            if not self.factory.registry.restored:
                await self.factory.registry.when_restored()  # the relay just started
        except Refused as e:
            self._refuse(e.code, e.reason, token)
            return
        except CancelledError:
            return  # the socket closed meanwhile
        if self._state is not _State.AUTHENTICATING:
            return  # the socket closed meanwhile
        self._token, self._grant = token, grant
        self._state = _State.CLAIMING
        self._decide(subdomain, offer_allowed=True)

    def _decide(self, requested: str | None, *, offer_allowed: bool) -> None:
        assert self._grant is not None and self._token is not None
        try:
            decision = authorize(self._grant, requested, self._token)
        except Refused as e:
            self._refuse(e.code, e.reason, self._token)
            return
        if isinstance(decision, str):
            self._claim(decision)
        elif offer_allowed:
            self._state = _State.PICK
            self._send_json({"subdomains": list(decision)})
        else:
            self._refuse(CloseCode.POLICY, "pick one subdomain")

    def _claim(self, subdomain: str) -> None:
        assert self._grant is not None and self._token is not None
        tunnel = self._new_tunnel(subdomain, self._grant.owner)
        assigned = subdomain in (self._grant.patterns or ())  # a concrete pattern: assigned by name
        cluster = self.factory.cluster
        if cluster is not None:
            # Not cancelled if the socket closes: the claim is seen through and then given back.
            Deferred.fromCoroutine(self._claim_in_cluster(cluster, tunnel, assigned)).addErrback(self._crashed)
            return
        try:
            self.factory.registry.claim(tunnel, peer=self._address, assigned=assigned)
        except Refused as e:
            self._refuse(e.code, e.reason, self._token)
            return
        self._registered(tunnel)

    async def _claim_in_cluster(self, cluster: ClusterNode, tunnel: LegacyTunnel | H2Tunnel, assigned: bool) -> None:
        """The same claim across the cluster; the directory may take a while, and the socket may
        close meanwhile (its claim is then given back)."""
        try:
            await cluster.claim(tunnel, peer=self._address, assigned=assigned)
        except Refused as e:
            if self._state is _State.CLAIMING:
                self._refuse(e.code, e.reason, self._token)
            return
        if self._state is not _State.CLAIMING:
            cluster.abandon(tunnel)
            return
        self._registered(tunnel)

    def _registered(self, tunnel: LegacyTunnel | H2Tunnel) -> None:
        assert self._token is not None
        subdomain = tunnel.subdomain
        self._cancel_timer()
        self._state = _State.REGISTERED
        url = self.factory.public_url(subdomain)
        answer: dict[str, Any] = {"subdomain": subdomain, "url": url}
        size = min(self._pool_asked, self.factory.limits.pool)
        if size and isinstance(tunnel, H2Tunnel):
            pool = tunnel.pool = SocketPool(subdomain, size, self.factory.observer,
                                            ask=lambda wanted: self._send_json({"pool": wanted}))
            answer["pool"] = {"key": pool.key, "size": pool.wanted, "max": size}
        self._send_json(answer)
        self.tunnel = tunnel
        if isinstance(tunnel, H2Tunnel):
            tunnel.start()
        self.factory.observer.registered(tunnel, token_hint(self._token), self._peer, url)

    # -- the tunnel on this socket

    def _new_tunnel(self, subdomain: str, owner: str) -> LegacyTunnel | H2Tunnel:
        """The tunnel for this socket's wire protocol, sharing the socket's guards."""
        assert self._budget is not None and self._outbound is not None
        if self._h2:
            return H2Tunnel(subdomain, owner, self._send_binary, self._close, budget=self._budget,
                            outbound=self._outbound)
        socket = cast(IPushProducer, self.transport)  # no flow control in the protocol: pause the socket
        return LegacyTunnel(subdomain, owner, self._send_text, self._close, socket.pauseProducing,
                            socket.resumeProducing, budget=self._budget, outbound=self._outbound)

    def _tunnel_message(self, payload: bytes, binary: bool) -> None:
        """The tunnels fail single streams themselves; a bug that still escapes closes this tunnel
        (1011, the gateway reconnects) instead of leaving Autobahn to drop the socket unexplained."""
        assert self.tunnel is not None
        try:
            self.tunnel.message(payload, binary)
        except Exception:
            self._log.failure("tunnel {subdomain}: handling a gateway message failed; closing it",
                              subdomain=self.tunnel.subdomain)
            self._close(CloseCode.INTERNAL_ERROR, "internal error")

    def _guard_socket(self) -> None:
        """Give this socket its control budget, and learn when its write buffer is full.

        twisted.web registered its HTTP channel as the transport's producer; the WebSocket has
        taken the transport over, so that registration is stale and `Outbound` replaces it.
        """
        limits = self.factory.limits
        self._budget = ControlBudget(limits.control_rate, self.factory.reactor)
        self._outbound = Outbound(limits.backlog)
        transport = cast(IConsumer, self.transport)
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self._outbound, True)

    def _write(self, payload: bytes, binary: bool) -> None:
        """A tunnel's message, unless the socket is closing (Autobahn would raise); a gateway that
        lets too much pile up unread is dropped instead."""
        if self.state != self.STATE_OPEN:
            return
        assert self._outbound is not None
        if not self._outbound.wrote(len(payload)):
            self._log.warn("tunnel {subdomain}: the gateway does not read ({size} bytes waiting); dropping it",
                           subdomain=getattr(self.tunnel, "subdomain", "?"), size=self._outbound.backlog)
            self.dropConnection(abort=True)
            return
        self.sendMessage(payload, isBinary=binary)

    # -- helpers

    def _send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def _send_text(self, payload: bytes) -> None:
        if self._state is _State.REGISTERED:
            self._write(payload, False)

    def _send_binary(self, payload: bytes) -> None:
        if self._state is _State.REGISTERED:
            self._write(payload, True)

    def _close(self, code: int, reason: str) -> None:
        if self._state is not _State.CLOSED:
            self.close_with(code, reason)
            if self._outbound is not None and self._outbound.full:
                # It is not reading: the close frame would only wait in memory for the handshake timeout.
                self.dropConnection(abort=True)

    def close_with(self, code: int, reason: str) -> None:
        """Close with any RFC 6455 code: Autobahn's sendClose only lets applications
        send 1000 and 3000-4999, but 1001, 1008 and 1011 are ours to send too."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=fit_reason(reason).encode("utf-8"), isReply=False)

    def _refuse(self, code: int, reason: str, token: str | None = None) -> None:
        self.factory.observer.refused(code, reason, token_hint(token) if token else None, self._peer)
        self._state = _State.REFUSED
        self._cancel_timer()
        self.close_with(code, reason)

    def _registration_timeout(self) -> None:
        self._timer = None
        if self.tunnel is None:
            self._refuse(CloseCode.POLICY, "registration timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _crashed(self, failure: Failure) -> None:
        self._log.failure("registration failed", failure)
        self._close(CloseCode.INTERNAL_ERROR, "internal error")


class RegistrationFactory(WebSocketServerFactory):
    """The registration sockets' factory: their collaborators, and Autobahn's limits set explicitly
    (its defaults are unlimited)."""

    protocol = RegistrationProtocol  # type: ignore[assignment]  # Factory's hint wants a protocol factory

    def __init__(self, reactor: Any, registry: Registry, auth: Authenticator, observer: RegistrationObserver, *,
                 rate: RegistrationRate, public_url: str, registration_timeout: float, max_message_size: int,
                 ping_interval: float, ping_timeout: float, limits: TunnelLimits = TunnelLimits(),
                 trusted: TrustedProxies | None = None, cluster: ClusterNode | None = None) -> None:
        """`cluster`: this node's part in a cluster, which every claim then goes through."""
        super().__init__(None, reactor=reactor)
        self.cluster = cluster
        self.limits = limits
        self.registry = registry
        self.auth = auth
        self.observer = observer
        self.rate = rate
        self.trusted = trusted or TrustedProxies()
        self.registration_timeout = registration_timeout
        self._public_url = public_url
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=registration_timeout,
            closeHandshakeTimeout=5,
            failByDrop=False,
        )

    def setProtocolOptions(self, *args: Any, **options: Any) -> None:
        """Autobahn copies its ~40 options from the factory onto every new protocol and pformats
        them all for a debug log, even when debug logs are off: a tenth of a registration's CPU,
        and 40 entries more in every socket's `__dict__`.  It copies only what the protocol does
        not have already (so that one protocol may be configured on its own), so the options go
        on a class made for this factory instead, with nothing left to copy or to log."""
        super().setProtocolOptions(*args, **options)
        self.protocol = type(RegistrationProtocol.__name__, (RegistrationProtocol,), {  # type: ignore[assignment]
            **{name: getattr(self, name) for name in RegistrationProtocol.CONFIG_ATTRS},
            "CONFIG_ATTRS": (),
        })

    def public_url(self, subdomain: str) -> str:
        """Where a tunnel is served: the `public_url` template with its `*` filled in."""
        return self._public_url.replace("*", subdomain, 1)
