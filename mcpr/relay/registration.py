"""`/_tunnel/register`: the WebSocket on which gateways claim a subdomain (docs/protocol.md, "Registration").

The token travels in the first message, never in the URL (URLs end up in
access logs).  Until a registration completes the socket may only carry the
registration exchange, and only for `registration_timeout` seconds.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode, Refused, fit_reason
from mcpr.relay.auth import authorize
from mcpr.relay.identity import token_hint
from mcpr.relay.tunnels.h2 import H2Tunnel
from mcpr.relay.tunnels.legacy import LegacyTunnel


class RegistrationProtocol(WebSocketServerProtocol):
    _log = Logger()  # autobahn owns self.log

    def __init__(self) -> None:
        super().__init__()
        self.tunnel: LegacyTunnel | H2Tunnel | None = None
        self._h2 = False
        self._state = "connecting"
        self._timer = None
        self._token: str | None = None
        self._grant = None

    # -- autobahn callbacks

    def onConnect(self, request: Any) -> str | None:
        """Gateways that offer `mcpr-tunnel.h2` get HTTP/2 streams; others the legacy JSON protocol."""
        self._peer = request.peer
        if wire.SUBPROTOCOL in request.protocols:
            self._h2 = True
            return wire.SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        relay = self.factory.relay
        self._state = "hello"
        self._timer = relay.reactor.callLater(relay.settings.registration_timeout, self._registration_timeout)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.tunnel is not None:
            self.tunnel.message(payload, isBinary)
            return
        if self._state not in ("hello", "pick") or isBinary:
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
        if self._state == "hello":
            token = message.get("token")
            self._state = "authenticating"
            Deferred.fromCoroutine(self._hello(token if isinstance(token, str) else "", subdomain)).addErrback(
                self._crashed)
        else:
            self._state = "claiming"
            self._decide(subdomain, offer_allowed=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._state = "closed"
        self._cancel_timer()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            relay = self.factory.relay
            relay.unregistered(tunnel)
            tunnel.closed()

    # -- registration

    async def _hello(self, token: str, subdomain: str | None) -> None:
        relay = self.factory.relay
        try:
            grant = await relay.auth.authenticate(token, subdomain)
        except Refused as e:
            self._refuse(e.code, e.reason, token)
            return
        if self._state != "authenticating":
            return  # the socket closed while the provider answered
        self._token, self._grant = token, grant
        self._state = "claiming"
        self._decide(subdomain, offer_allowed=True)

    def _decide(self, requested: str | None, *, offer_allowed: bool) -> None:
        try:
            decision = authorize(self._grant, requested, self._token)
        except Refused as e:
            self._refuse(e.code, e.reason, self._token)
            return
        if isinstance(decision, str):
            self._claim(decision)
        elif offer_allowed:
            self._state = "pick"
            self._send_json({"subdomains": list(decision)})
        else:
            self._refuse(CloseCode.POLICY, "pick one subdomain")

    def _claim(self, subdomain: str) -> None:
        relay = self.factory.relay
        tunnel: LegacyTunnel | H2Tunnel
        if self._h2:
            tunnel = H2Tunnel(subdomain, self._grant.owner, self._send_binary, self._close)
        else:
            tunnel = LegacyTunnel(subdomain, self._grant.owner, self._send_text, self._close,
                                  self.transport.pauseProducing, self.transport.resumeProducing)
        try:
            relay.registry.claim(tunnel)
        except Refused as e:
            self._refuse(e.code, e.reason, self._token)
            return
        self._cancel_timer()
        self._state = "registered"
        url = relay.public_url(subdomain)
        self._send_json({"subdomain": subdomain, "url": url})
        self.tunnel = tunnel
        if self._h2:
            tunnel.start()
        relay.registered(tunnel, self._token, self._peer)

    # -- helpers

    def _send_json(self, message: dict) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def _send_text(self, payload: bytes) -> None:
        if self._state == "registered":
            self.sendMessage(payload, isBinary=False)

    def _send_binary(self, payload: bytes) -> None:
        if self._state == "registered":
            self.sendMessage(payload, isBinary=True)

    def _close(self, code: int, reason: str) -> None:
        if self._state != "closed":
            self.close_with(code, reason)

    def close_with(self, code: int, reason: str) -> None:
        """Close with any RFC 6455 code: Autobahn's sendClose only lets applications
        send 1000 and 3000-4999, but 1001, 1008 and 1011 are ours to send too."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=fit_reason(reason).encode("utf-8"), isReply=False)

    def _refuse(self, code: int, reason: str, token: str | None = None) -> None:
        relay = self.factory.relay
        relay.refused(code, reason, token_hint(token) if token else None, getattr(self, "_peer", None))
        self._state = "refused"
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

    def _crashed(self, failure) -> None:
        self._log.failure("registration failed", failure)
        self._close(CloseCode.INTERNAL_ERROR, "internal error")


def registration_resource(relay, reactor) -> WebSocketResource:
    """The WebSocket endpoint with limits set explicitly: Autobahn's defaults are unlimited."""
    settings = relay.settings
    factory = WebSocketServerFactory(None, reactor=reactor)
    factory.protocol = RegistrationProtocol
    factory.relay = relay
    factory.setProtocolOptions(
        maxMessagePayloadSize=settings.max_message_size,
        maxFramePayloadSize=settings.max_message_size,
        autoPingInterval=settings.ping_interval,
        autoPingTimeout=settings.ping_timeout,
        openHandshakeTimeout=settings.registration_timeout,
        closeHandshakeTimeout=5,
        failByDrop=False,
    )
    return WebSocketResource(factory)
