"""The gateway's tunnel client: register with the relay, serve streams, and never lose the URL.

A reconnect loop of our own rather than `ClientService`: only a completed
registration counts as success (ClientService resets its backoff on TCP
connect and would hammer a relay that refuses us), and some refusals (bad
token, evicted, name taken) must end the loop instead of retrying it
(docs/protocol.md, "Liveness and reconnection").  While the tunnel is down
the gateway keeps serving locally.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from mcpr.common import protocol as wire
from mcpr.common.names import is_concrete, matches, valid_label
from mcpr.common.protocol import CloseCode
from mcpr.common.web import no_delay
from mcpr.gateway.h2_server import serve_streams, stop_streams
from mcpr.proxy.events import EventLog

log = Logger()

# Close codes after which retrying cannot help: the user must change something.
FINAL = {
    CloseCode.AUTH_FAILED: "the relay refused the tunnel token",
    CloseCode.EVICTED: "another gateway registered with the same token and subdomain; this one stops its tunnel",
    CloseCode.IN_USE: "the subdomain belongs to another token on this relay",
    CloseCode.INVALID_SUBDOMAIN: "the subdomain is not a valid DNS label",
    CloseCode.TOO_MANY: "this token already holds as many tunnels as the relay allows",
}
assert set(FINAL) == {code for code in CloseCode if code.final}


class Closed(Exception):
    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason or ""


class NoChoice(Exception):
    """The relay offered several subdomains and nobody can pick one."""


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
    """(ws URL of the registration endpoint, host, port, TLS?) for a relay's http(s) URL."""
    parts = urlsplit(relay_url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = parts.path.rstrip("/") + wire.REGISTER_PATH
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{port}"
    return f"{'wss' if secure else 'ws'}://{netloc}{path}", host, port, secure


def choose_on_terminal(patterns: list[str]) -> Deferred[str]:
    """Ask on the terminal which offered subdomain to take (in a thread: input() blocks)."""
    if not sys.stdin or not sys.stdin.isatty():
        raise NoChoice(
            "the relay offers the subdomains " + ", ".join(patterns)
            + "; choose one with --subdomain NAME (or MCPR_TUNNEL_SUBDOMAIN, or [tunnel] subdomain in mcpr.toml)")

    def ask() -> str:
        while True:
            answer = input(f"The relay offers: {', '.join(patterns)}. Subdomain to use: ").strip().lower()
            if valid_label(answer) and any(matches(p, answer) for p in patterns):
                return answer
            print(f"{answer!r} does not match any of: {', '.join(patterns)}")

    return deferToThread(ask)


class TunnelProtocol(WebSocketClientProtocol):
    """One connection to the relay: the registration exchange, then HTTP/2 streams."""

    _log = Logger()  # autobahn owns self.log

    def __init__(self) -> None:
        super().__init__()
        self.registered: Deferred[str] = Deferred()
        self.closed: Deferred[tuple[int | None, str]] = Deferred()
        self._h2 = None
        self._subprotocol: str | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)  # HTTP/2 frames are small writes; Nagle would hold them ~40 ms
        super().connectionMade()

    def onConnect(self, response: Any) -> None:
        self._subprotocol = response.protocol

    def onOpen(self) -> None:
        client: TunnelClient = self.factory.client
        if self._subprotocol != wire.SUBPROTOCOL:
            self.sendClose(1000)
            self._fail(Closed(CloseCode.PROTOCOL_ERROR, f"the relay does not speak {wire.SUBPROTOCOL}"))
            return
        self._send({"token": client.token, "subdomain": client.subdomain})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._h2 is not None:
            if isBinary:
                self._h2.dataReceived(payload)
            return
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._fail(Closed(CloseCode.PROTOCOL_ERROR, "unexpected message from the relay"))
            self.dropConnection(abort=True)
            return
        if "url" in message:
            client: TunnelClient = self.factory.client
            client.subdomain = message.get("subdomain") or client.subdomain
            self._h2 = serve_streams(self, client.site, client.reactor)
            if not self.registered.called:
                self.registered.callback(message["url"])
        elif "subdomains" in message:
            self._pick([p for p in message["subdomains"] if isinstance(p, str)])

    def _pick(self, patterns: list[str]) -> None:
        client: TunnelClient = self.factory.client
        concrete = [p for p in patterns if is_concrete(p)]
        if len(patterns) == 1 and concrete:
            self._send({"subdomain": concrete[0]})
            return
        try:
            d = client.choose(patterns)
        except NoChoice as e:
            self._fail(Closed(CloseCode.POLICY, str(e)), final=True)
            self.sendClose(1000)
            return

        def picked(name: str) -> None:
            client.subdomain = name  # kept for reconnects, even if this socket timed out meanwhile
            if self.state == self.STATE_OPEN:
                self._send({"subdomain": name})

        d.addCallbacks(picked, lambda f: self.sendClose(1000))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._h2 is not None:
            stop_streams(self._h2, Failure(ConnectionError(f"tunnel closed ({code})")))
            self._h2 = None
        self._fail(Closed(code, reason))
        if not self.closed.called:
            self.closed.callback((code, reason or ""))

    def _fail(self, error: Closed, final: bool = False) -> None:
        error.final = final
        if not self.registered.called:
            self.registered.errback(error)

    def _send(self, message: dict) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)


class TunnelClient(Service):
    """Keeps one registration with the relay alive, serving its streams with `site`."""

    def __init__(self, reactor, relay_url: str, token: str, subdomain: str | None, site: Site,
                 events: EventLog, on_url: Callable[[str], None], *, ping_interval: float = 20.0,
                 ping_timeout: float = 10.0, backoff: Backoff | None = None,
                 choose: Callable[[list[str]], Deferred[str]] = choose_on_terminal) -> None:
        self.reactor = reactor
        self.relay_url = relay_url
        self.token = token
        self.subdomain = subdomain
        self.site = site
        self.choose = choose
        self._events = events
        self._on_url = on_url
        self._backoff = backoff or Backoff()
        url, host, port, secure = websocket_url(relay_url)
        endpoint = HostnameEndpoint(reactor, host, port, timeout=10)
        self._endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint) if secure else endpoint
        self._factory = WebSocketClientFactory(url, protocols=[wire.SUBPROTOCOL], reactor=reactor)
        self._factory.protocol = TunnelProtocol
        self._factory.noisy = False
        self._factory.client = self
        self._factory.setProtocolOptions(
            autoPingInterval=ping_interval, autoPingTimeout=ping_timeout, openHandshakeTimeout=10,
            closeHandshakeTimeout=5, maxMessagePayloadSize=4 * wire.MAX_MESSAGE,
            maxFramePayloadSize=4 * wire.MAX_MESSAGE)
        self._loop: Deferred | None = None
        self._sleep: Deferred | None = None
        self._current: TunnelProtocol | None = None
        self._connecting: Deferred | None = None
        self.url: str | None = None
        self.state = "idle"

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("tunnel loop crashed", f))

    def _event(self, state: str, **fields: Any) -> None:
        self.state = state
        self._events.emit("tunnel", self.reactor.seconds(), state=state, relay=self.relay_url, **fields)

    async def _run(self) -> None:
        failures = 0
        attempt = 0
        while self.running:
            attempt += 1
            self._event("connecting", attempt=attempt)
            log.info("tunnel: connecting to {relay} (attempt {attempt})", relay=self.relay_url, attempt=attempt)
            try:
                self._connecting = self._endpoint.connect(self._factory)
                proto = await self._connecting
                self._connecting = None
                self._current = proto
                url = await proto.registered
            except CancelledError:
                return
            except Closed as e:
                self._current = None
                if e.code in FINAL or getattr(e, "final", False):
                    self._give_up(e.code, e.reason)
                    return
                failures += 1
                log.warn("tunnel: registration failed ({code} {reason})", code=e.code, reason=e.reason)
            except Exception as e:
                self._current = None
                failures += 1
                log.warn("tunnel: cannot reach {relay}: {why}", relay=self.relay_url, why=str(e) or repr(e))
            else:
                failures = 0
                self.url = url
                self._event("connected", url=url, subdomain=self.subdomain)
                self._on_url(url)
                code, reason = await proto.closed
                self._current = None
                self._event("disconnected", code=code, reason=reason)
                if not self.running:
                    return
                if code in FINAL:
                    self._give_up(code, reason)
                    return
                log.warn("tunnel: connection to the relay lost ({code} {reason})", code=code, reason=reason)
            if not self.running:
                return
            delay = self._backoff.delay(max(failures, 1))
            self._event("reconnecting", delay_s=round(delay, 3))
            log.info("tunnel: reconnecting in {delay:.2f} s", delay=delay)
            self._sleep = deferLater(self.reactor, delay, lambda: None)
            try:
                await self._sleep
            except CancelledError:
                return
            finally:
                self._sleep = None

    def _give_up(self, code: int | None, reason: str) -> None:
        why = FINAL.get(code, "the tunnel cannot be registered")
        self._event("evicted" if code == CloseCode.EVICTED else "stopped", code=code, reason=reason)
        log.error("tunnel stopped: {why} ({code} {reason}); still serving locally", why=why, code=code,
                  reason=reason)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._sleep is not None:
            self._sleep.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        current, self._current = self._current, None
        if current is None:
            return self._loop if self._loop is not None else succeed(None)
        if current.state == current.STATE_OPEN:
            current.sendClose(1000)
        else:
            current.dropConnection(abort=True)
        timeout = self.reactor.callLater(5, current.dropConnection, True)
        done = current.closed.addBoth(lambda _: timeout.active() and timeout.cancel())
        return done.addBoth(lambda _: self._loop)
