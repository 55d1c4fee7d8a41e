"""The gateway's tunnel client: register with the relay, serve streams, and never lose the URL.

Twisted's `ClientService` keeps the connection up; three things are ours:

- Only a completed registration counts as success.  ClientService resets its
  failure count whenever a TCP connection is made, so a relay that accepts TCP
  and then refuses the upgrade or the token would be retried at the first,
  shortest delay for ever.  Its `prepareConnection` (success only once a given
  Deferred fires) cannot be used either: a socket that closes while that
  Deferred is pending, which is exactly what a refusal is, raises automat's
  `NoTransition` for `_clientDisconnected` in the `Connecting` or `Waiting`
  state, and the service never retries again (Twisted 26.10, checked).  So
  the retry policy ignores ClientService's count and uses ours, which only a
  registration resets.
- Some refusals (`CloseCode.final`: bad token, evicted, ...; or no way to
  choose a subdomain) stop the service instead of retrying: the user must
  change something first (docs/protocol.md, "Liveness and reconnection").
- An offer of several subdomains is answered by a person, who may take a
  while: the socket is closed at once (the relay gives a registration 10 s),
  the service pauses while the terminal asks, and the next registration asks
  for the name chosen.
  A name held or reserved by another token (4003) and a full relay (4008)
  may clear up by themselves: the service keeps retrying with its backoff and
  says what is going on once, not at every retry.
- Stopping says goodbye (a WebSocket close) before ClientService lets go of
  the socket, which it would otherwise just close.

While the tunnel is down the gateway keeps serving locally.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import typing
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorFromThreads,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer, provider

from mcpr.common import protocol as wire
from mcpr.common.host_endpoint import HostEndpoint
from mcpr.common.names import is_concrete, matches, valid_label
from mcpr.common.protocol import PROVIDER_UNAVAILABLE, CloseCode
from mcpr.common.web import no_delay
from mcpr.gateway.h2_server import serve_streams
from mcpr.gateway.pool import LanePool

log = Logger()

# What to tell the user when a close code ends the tunnel.  Whether a code is
# final is `CloseCode.final`'s decision alone, so a code can stop being final
# (or become final) in mcpr/common/protocol.py without a change here.
WHY_FINAL: dict[int | None, str] = {
    CloseCode.AUTH_FAILED: "the relay refused the tunnel token",
    CloseCode.EVICTED: "another gateway registered with the same token and subdomain; this one stops its tunnel",
    CloseCode.INVALID_SUBDOMAIN: "the subdomain is not a valid DNS label",
}

# What to tell the user, once, when a refusal that may clear up by itself keeps the tunnel down.
WHY_WAITING: dict[int, str] = {
    CloseCode.IN_USE: "tunnel: the subdomain {name} is taken on this relay: {reason}. Retrying until it is "
                      "free (every {cap:.0f} s at most); to use another name now, restart with "
                      "--subdomain OTHER (or [tunnel] subdomain in mcpr.toml)",
    CloseCode.TOO_MANY: "tunnel: the relay takes no more tunnels now: {reason}. Retrying (every {cap:.0f} s "
                        "at most); close other tunnels of this token or ask the relay's operator",
    CloseCode.AUTH_FAILED: "tunnel: the relay cannot check tokens now ({reason}). Retrying (every {cap:.0f} s "
                           "at most)",
    CloseCode.TRY_AGAIN_LATER: "tunnel: the relay takes no new tunnels now ({reason}). Retrying (every "
                               "{cap:.0f} s at most)",
}


_POOL_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")  # sent back as a header value: no more than this
_FINAL = frozenset(code for code in CloseCode if code.final)
assert _FINAL <= set(WHY_FINAL)


def is_final(code: int | None, reason: str = "") -> bool:
    """Whether a close says that retrying cannot help.  A relay whose auth provider is down says
    4001 too, but that clears up by itself: it is retried."""
    return code in _FINAL and not (code == CloseCode.AUTH_FAILED and reason == PROVIDER_UNAVAILABLE)


# How long the relay may take to answer a registration message (it refuses a silent gateway after
# its own registration_timeout, 10 s by default; an auth provider may take 5 s of that).
REGISTRATION_ANSWER_TIMEOUT = 30.0


class Refusal(Exception):
    """Why the gateway closed the socket itself; it reports `code` and this message as the close."""

    code: CloseCode = CloseCode.PROTOCOL_ERROR


class Broken(Refusal):
    """Something failed inside the tunnel (the relay's input or our HTTP/2 server): the socket is
    closed with 1011 and the tunnel reconnects, since a fresh connection has fresh state."""

    code = CloseCode.INTERNAL_ERROR


class NoChoice(Refusal):
    """The relay offered several subdomains and nobody can pick one: final, only the user can choose."""

    code = CloseCode.POLICY


class Choosing(Refusal):
    """The relay offered several subdomains: this socket is closed while someone chooses one."""

    code = CloseCode.NORMAL

    def __init__(self, patterns: list[str]) -> None:
        super().__init__("the relay offers several subdomains")
        self.patterns = patterns


class EventSink(typing.Protocol):
    """Where tunnel events go (the `--events` stream)."""

    def emit(self, type: str, ts: float, **fields: Any) -> None: ...


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so a fleet of gateways does not reconnect in step."""

    initial: float = 0.25
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        base = min(self.cap, self.initial * self.factor ** max(0, failures - 1))
        return base * (1 - self.jitter + 2 * self.jitter * rng())


def websocket_url(relay_url: str) -> tuple[str, str, int, bool]:
    """(ws URL of the registration endpoint, host, port, TLS?) for a relay's URL (settings'
    `parse_relay_url`: http, https, ws or wss).  The path is the relay's base path plus
    `/_tunnel/register`, unless it already ends so (copied from the relay's status page)."""
    parts = urlsplit(relay_url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = parts.path.rstrip("/")
    if not path.endswith(wire.REGISTER_PATH):
        path += wire.REGISTER_PATH
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{port}"
    return f"{'wss' if secure else 'ws'}://{netloc}{path}", host, port, secure


def choose_on_terminal(patterns: list[str]) -> Deferred[str]:
    """Ask on the terminal which offered subdomain to take.

    The question goes to the real stderr: under `twist`, `sys.stdout` and `sys.stderr` are the log,
    which holds a line until its newline, and a prompt has none.  The answer is read in a daemon
    thread, not the reactor's pool, which would wait for a blocked read before the process exits.
    Raises `NoChoice` at once without a terminal; fails with it when the terminal closes (Ctrl-D).
    """
    how = "choose one with --subdomain NAME (or MCPR_TUNNEL_SUBDOMAIN, or [tunnel] subdomain in mcpr.toml)"
    if not sys.stdin or not sys.stdin.isatty():
        raise NoChoice(f"the relay offers the subdomains {', '.join(patterns)}; {how}")
    from twisted.internet import reactor as _reactor
    reactor = typing.cast(IReactorFromThreads, _reactor)
    terminal = sys.__stderr__ or sys.__stdout__
    answered: Deferred[str] = Deferred()

    def say(text: str) -> None:
        if terminal is not None:
            terminal.write(text)
            terminal.flush()

    def ask() -> None:
        say(f"\nThe relay offers the subdomains {', '.join(patterns)} for this token "
            f"(a * stands for any name you make up).\n")
        while True:
            say("Subdomain to use: ")
            line = sys.stdin.readline()
            if not line:
                reactor.callFromThread(answered.errback, NoChoice(f"no subdomain chosen on the terminal; {how}"))
                return
            answer = line.strip().lower()
            if valid_label(answer) and any(matches(p, answer) for p in patterns):
                reactor.callFromThread(answered.callback, answer)
                return
            say(f"{answer!r} does not match any of: {', '.join(patterns)}\n")

    threading.Thread(target=ask, name="mcpr subdomain question", daemon=True).start()
    return answered


class TunnelOwner(typing.Protocol):
    """Who hears what happens to each connection (the `TunnelClient`)."""

    def tunnel_made(self, tunnel: TunnelProtocol) -> None: ...

    def tunnel_registered(self, url: str) -> None: ...

    def tunnel_closed(self, code: int | None, reason: str, *, registered: bool, final: bool,
                      offered: list[str] | None = None) -> None: ...


class TunnelProtocol(WebSocketClientProtocol):
    """One connection to the relay: the registration exchange, then HTTP/2 streams."""

    factory: TunnelFactory

    def __init__(self) -> None:
        super().__init__()
        self._subprotocol: str | None = None
        self._h2: IProtocol | None = None
        self._registered = False
        self._refusal: Refusal | None = None
        self._answer_timer: IDelayedCall | None = None
        self._lanes: LanePool | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)  # HTTP/2 frames are small writes; Nagle would hold them ~40 ms
        super().connectionMade()
        self.factory.owner.tunnel_made(self)

    def onConnect(self, response: Any) -> None:
        self._subprotocol = response.protocol

    def onOpen(self) -> None:
        if self._subprotocol != wire.SUBPROTOCOL:
            self._refusal = Refusal(f"the relay does not speak {wire.SUBPROTOCOL}")
            self.sendClose(1000)
            return
        hello: dict[str, Any] = {"token": self.factory.token, "subdomain": self.factory.subdomain}
        if self.factory.pool_size:
            hello["pool"] = self.factory.pool_size
        self._send_json(hello)
        self._await_answer()

    def _await_answer(self) -> None:
        """A relay that takes the socket but never answers the registration must not hold the
        tunnel in "connecting" for ever: give up on this socket, and retry with the backoff."""
        self._stop_waiting()
        self._answer_timer = self.factory.reactor.callLater(REGISTRATION_ANSWER_TIMEOUT, self._no_answer)

    def _stop_waiting(self) -> None:
        if self._answer_timer is not None and self._answer_timer.active():
            self._answer_timer.cancel()
        self._answer_timer = None

    def _no_answer(self) -> None:
        self._answer_timer = None
        self._refusal = Refusal(f"the relay did not answer the registration within {REGISTRATION_ANSWER_TIMEOUT:g} s")
        self.dropConnection(abort=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """The relay's input: whatever it sends, an exception never escapes to leave the socket
        open and the tunnel dead; it closes the tunnel, which then reconnects."""
        try:
            if self._h2 is not None:
                if isBinary:
                    self._h2.dataReceived(payload)
                else:
                    self._control(payload)
                return
            self._stop_waiting()
            self._registration_answer(payload)
        except Exception:
            log.failure("tunnel: failed on a message from the relay")
            self.fail_tunnel("gateway failure on the relay's input")

    def _registration_answer(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._refusal = Refusal("unexpected message from the relay")
            self.dropConnection(abort=True)
            return
        if "url" in message:
            url, subdomain = message["url"], message.get("subdomain")
            if not isinstance(url, str) or not (subdomain is None or isinstance(subdomain, str)):
                self._refusal = Refusal("malformed registration answer from the relay")
                self.dropConnection(abort=True)
                return
            asked = self.factory.subdomain
            if asked and subdomain and subdomain != asked:
                # A token for exactly one name gets that name whatever it asks for (docs/protocol.md).
                log.warn("tunnel: asked for the subdomain {asked}, the relay assigned {subdomain}",
                         asked=asked, subdomain=subdomain)
            self.factory.subdomain = subdomain or asked
            self._h2 = serve_streams(self, self.factory.site, self.factory.reactor)
            self._registered = True
            self._open_lanes(message.get("pool"))
            self.factory.owner.tunnel_registered(url)
        elif "subdomains" in message:
            offered = message["subdomains"]
            patterns = [p for p in offered if isinstance(p, str)] if isinstance(offered, list) else []
            if not patterns:
                self._refusal = Refusal("malformed subdomain offer from the relay")
                self.dropConnection(abort=True)
                return
            self._pick(patterns)

    def _control(self, payload: bytes) -> None:
        """A control message from the relay beside the HTTP/2 bytes: `{"pool": N}` asks for N
        pooled sockets (this gateway opens at most its own `tunnel_pool`).  Anything else is
        ignored, so that a newer relay's messages do not break this gateway."""
        try:
            message = json.loads(payload)
        except ValueError:
            return
        wanted = message.get("pool") if isinstance(message, dict) else None
        if self._lanes is not None and isinstance(wanted, int) and not isinstance(wanted, bool):
            self._lanes.grow(wanted)

    def _open_lanes(self, offer: Any) -> None:
        """The pooled sockets the registration answer offers, if it offers any (docs/protocol.md)."""
        if offer is None or not self.factory.pool_size:
            return
        key, size = (offer.get("key"), offer.get("size")) if isinstance(offer, dict) else (None, None)
        if not (isinstance(key, str) and _POOL_KEY.fullmatch(key) and isinstance(size, int)
                and not isinstance(size, bool) and 0 < size <= wire.MAX_POOL):
            log.warn("tunnel: the relay's pooled-socket offer is malformed; using the tunnel alone")
            return
        factory = self.factory
        assert factory.pool_endpoint is not None and factory.subdomain is not None
        parts = urlsplit(factory.url)
        path = parts.path[: -len(wire.REGISTER_PATH)] + wire.POOL_PATH
        self._lanes = LanePool(factory.reactor, factory.pool_endpoint, host=parts.netloc, path=path,
                               subdomain=factory.subdomain, key=key, size=min(size, factory.pool_size),
                               limit=factory.pool_size, site=factory.site)
        self._lanes.start()

    def fail_tunnel(self, reason: str) -> None:
        """Close with 1011 (Autobahn's sendClose allows only 1000 and 3000-4999): the relay's
        input or our HTTP/2 server failed, so reconnect and start afresh."""
        if self._refusal is None:
            self._refusal = Broken(reason)
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=int(CloseCode.INTERNAL_ERROR), reasonUtf8=wire.fit_reason(reason).encode(),
                                isReply=False)
        elif self.state != self.STATE_CLOSING:
            self.dropConnection(abort=True)

    def _pick(self, patterns: list[str]) -> None:
        """One concrete name is taken at once; a choice is the owner's, made with this socket closed."""
        if len(patterns) == 1 and is_concrete(patterns[0]):
            self._send_json({"subdomain": patterns[0]})
            self._await_answer()
            return
        self._refusal = Choosing(patterns)
        self.sendClose(1000)

    def say_goodbye(self) -> None:
        """End this connection on purpose: a clean close if it is open (Autobahn drops the
        socket if the relay does not answer within closeHandshakeTimeout), else drop it."""
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        else:
            self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._stop_waiting()
        if self._lanes is not None:
            lanes, self._lanes = self._lanes, None
            lanes.stop()
        if self._h2 is not None:
            h2, self._h2 = self._h2, None
            try:
                # Every stream's request sees its client leave, so upstream calls are cancelled.
                h2.connectionLost(Failure(ConnectionError(f"tunnel closed ({code})")))
            except Exception:  # the owner must hear of the close whatever happens, or nobody reconnects
                log.failure("tunnel: error while ending the tunnel's streams")
        refusal = self._refusal
        if refusal is not None:
            code, reason = refusal.code, str(refusal)
        self.factory.owner.tunnel_closed(code, reason or "", registered=self._registered,
                                         final=is_final(code, reason or ""),
                                         offered=refusal.patterns if isinstance(refusal, Choosing) else None)

    def _send_json(self, message: dict) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)


class TunnelFactory(WebSocketClientFactory):
    """Gives each connection what it registers with, the site its streams are served by, and its owner."""

    protocol = TunnelProtocol  # type: ignore[assignment]  # autobahn does not parametrize Factory
    noisy = False

    def __init__(self, url: str, *, token: str, subdomain: str | None, site: Site, owner: TunnelOwner,
                 reactor: Any, pool_size: int = 0, pool_endpoint: IStreamClientEndpoint | None = None) -> None:
        """`pool_size` pooled sockets are asked for at each registration and opened through
        `pool_endpoint`, the relay's address as the WebSocket reaches it."""
        super().__init__(url, protocols=[wire.SUBPROTOCOL], reactor=reactor)
        self.token = token
        self.subdomain = subdomain  # the relay's answer or the user's pick, kept for reconnects
        self.site = site
        self.owner = owner
        self.pool_size = pool_size if pool_endpoint is not None else 0
        self.pool_endpoint = pool_endpoint


@provider(ILogObserver)
def _discard(event: dict) -> None:
    pass


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """The relay's endpoint, telling its listeners of every attempt and every failure to connect
    (ClientService offers no hook for either; magic-wormhole wraps its endpoint the same way)."""

    def __init__(self, endpoint: IStreamClientEndpoint, attempting: Callable[[], None],
                 failed: Callable[[Failure], Failure]) -> None:
        self._endpoint = endpoint
        self._attempting = attempting
        self._failed = failed

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self._attempting()
        return self._endpoint.connect(factory).addErrback(self._failed)


class TunnelClient(ClientService):
    """Keeps one registration with the relay alive, serving its streams with `site`.

    `whenConnected()` fires with the `TunnelProtocol` once its socket is up,
    before the relay has answered the registration.
    """

    # ClientService logs "Scheduling retry {attempt} ..." at info with its own
    # count, which restarts at every TCP connect; the retry policy below logs
    # the delay that really applies.  `_log` is ClientService's private logger
    # (Twisted 26.10): if it is renamed, only that extra line comes back.
    _log = Logger(observer=_discard)

    def __init__(self, reactor: Any, relay_url: str, token: str, subdomain: str | None, site: Site,
                 events: EventSink, on_url: Callable[[str], None], *, ping_interval: float = 20.0,
                 ping_timeout: float = 10.0, backoff: Backoff | None = None,
                 choose: Callable[[list[str]], Deferred[str]] = choose_on_terminal, pool: int = 0) -> None:
        """`pool`: pooled sockets to ask the relay for beside the tunnel (0: none)."""
        self.relay_url = relay_url
        self.url: str | None = None
        self.state = "idle"
        self._reactor = reactor
        self._events = events
        self._on_url = on_url
        self._backoff = backoff or Backoff()
        self._attempts = 0
        self._failures = 0  # failed attempts since the last completed registration
        self._told: int | None = None  # the WHY_WAITING refusal the user was told of, until it changes
        self._current: TunnelProtocol | None = None
        self._goodbye: Deferred[None] | None = None
        self._choose = choose
        self._stopping = False  # stopService was called: a choice made afterwards must not restart it
        url, host, port, secure = websocket_url(relay_url)
        endpoint: IStreamClientEndpoint = HostEndpoint(reactor, host, port, timeout=10)
        if secure:
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        self._factory = TunnelFactory(url, token=token, subdomain=subdomain, site=site, owner=self, reactor=reactor,
                                      pool_size=pool, pool_endpoint=endpoint)
        self._factory.setProtocolOptions(
            autoPingInterval=ping_interval, autoPingTimeout=ping_timeout, openHandshakeTimeout=10,
            closeHandshakeTimeout=5, maxMessagePayloadSize=4 * wire.MAX_MESSAGE,
            maxFramePayloadSize=4 * wire.MAX_MESSAGE)
        super().__init__(_ObservedEndpoint(endpoint, self._attempting, self._unreachable), self._factory,
                         retryPolicy=self._retry_delay, clock=reactor)

    def _event(self, state: str, **fields: Any) -> None:
        self.state = state
        self._events.emit("tunnel", self._reactor.seconds(), state=state, relay=self.relay_url, **fields)

    def _attempting(self) -> None:
        self._attempts += 1
        self._event("connecting", attempt=self._attempts)
        log.info("tunnel: connecting to {relay} (attempt {attempt})", relay=self.relay_url, attempt=self._attempts)

    def _unreachable(self, failure: Failure) -> Failure:
        if not failure.check(CancelledError, ConnectingCancelledError):
            why = str(failure.value) or repr(failure.value)
            log.warn("tunnel: cannot reach {relay}: {why}", relay=self.relay_url, why=why)
        return failure

    def _retry_delay(self, attempt: int) -> float:
        """The retry policy: ClientService's `attempt` restarts at every TCP connect, ours only
        at a completed registration."""
        self._failures += 1
        delay = self._backoff.delay(self._failures)
        self._event("reconnecting", delay_s=round(delay, 3))
        if self._told is None:  # while waiting for a name, the message said it all
            log.info("tunnel: reconnecting in {delay:.2f} s", delay=delay)
        return delay

    def tunnel_made(self, tunnel: TunnelProtocol) -> None:
        self._current = tunnel

    def tunnel_registered(self, url: str) -> None:
        self._failures = 0
        self._told = None
        self.url = url
        self._event("connected", url=url, subdomain=self._factory.subdomain)
        self._on_url(url)

    def tunnel_closed(self, code: int | None, reason: str, *, registered: bool, final: bool,
                      offered: list[str] | None = None) -> None:
        # Called from the socket's connectionLost, before ClientService hears of it: stopping the
        # service here means it never schedules a retry.
        self._current = None
        if registered:
            self._event("disconnected", code=code, reason=reason)
        if self._goodbye is not None:
            goodbye, self._goodbye = self._goodbye, None
            super().stopService().chainDeferred(goodbye)
        elif offered is not None:
            self._ask(offered)
        elif final:
            self._give_up(code, reason)
            super().stopService()
        elif not registered and code in WHY_WAITING:
            if self._told != code:
                self._told = code
                name = repr(self._factory.subdomain) if self._factory.subdomain else "asked for"
                log.warn(WHY_WAITING[code], name=name, reason=reason, cap=self._backoff.cap)
        else:
            self._told = None
            if registered:
                log.warn("tunnel: connection to the relay lost ({code} {reason})", code=code, reason=reason)
            else:
                log.warn("tunnel: registration failed ({code} {reason})", code=code, reason=reason)

    def _ask(self, patterns: list[str]) -> None:
        """Pause the service while a person chooses among the offered subdomains (however long
        that takes), then register again asking for the name chosen."""
        try:
            choice = self._choose(patterns)
        except NoChoice as e:
            self._give_up(e.code, str(e))
            super().stopService()
            return
        self._event("choosing", offered=patterns)
        paused = super().stopService()

        def chosen(name: str) -> Deferred[None] | None:
            self._factory.subdomain = name
            if self._stopping:
                return None
            log.info("tunnel: registering the subdomain {name} (to skip the question next time: --subdomain {name})",
                     name=name)
            return paused.addCallback(lambda _: ClientService.startService(self))

        def not_chosen(failure: Failure) -> None:
            if not self._stopping:
                self._give_up(CloseCode.POLICY, str(failure.value))

        choice.addCallbacks(chosen, not_chosen)

    def _give_up(self, code: int | None, reason: str) -> None:
        why = WHY_FINAL.get(code, "the tunnel cannot be registered")
        self._event("evicted" if code == CloseCode.EVICTED else "stopped", code=code, reason=reason)
        log.error("tunnel stopped: {why} ({code} {reason}); still serving locally", why=why, code=code,
                  reason=reason)

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Close an open tunnel with a goodbye first; ClientService stops once the socket is gone."""
        self._stopping = True
        if self._current is None:
            return super().stopService()
        if self._goodbye is None:
            self._goodbye = Deferred()
            self._current.say_goodbye()
        return self._goodbye
