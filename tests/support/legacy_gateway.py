"""A gateway that speaks the original mcpr's JSON tunnel protocol (docs/protocol.md, "Legacy JSON protocol").

Tests drive it by hand: take each request the relay sends from `requests`,
answer with `send(...)`, and watch `cancels` and `closed`.
"""

from __future__ import annotations

import base64
import json

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.support.ws_client import client_factory, close_cleanly


class Closed(Exception):
    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._message(json.loads(payload))

    def onClose(self, wasClean: bool, code, reason) -> None:
        self.factory.client._closed_with(code, reason)


class LegacyGateway:
    def __init__(self, port: int, token: str | None, subdomain: str | None = None, *, pick: str | None = None,
                 hello: dict | None = None, source: str = "127.0.0.1", answers_offers: bool = True) -> None:
        """`source`: the loopback address to connect from (the relay counts registrations per address);
        `answers_offers=False`: an original mcpr client of the kind that never answers an offer (it
        only reads the ack), so one left waiting is closed by the relay's registration timeout."""
        self.port = port
        self.source = source
        self.hello = hello if hello is not None else {"token": token, "subdomain": subdomain}
        self.pick = pick
        self.answers_offers = answers_offers
        self.requests: DeferredQueue = DeferredQueue()
        self.cancels: DeferredQueue = DeferredQueue()
        self.offers: list = []
        self.ack: dict | None = None
        self.closed: Deferred = Deferred()
        self.close_code: int | None = None
        self._registered: Deferred = Deferred()
        self.proto: _Protocol | None = None

    async def connect(self) -> dict:
        """The relay's ack; raises Closed if the relay refuses the registration."""
        factory = client_factory(f"ws://127.0.0.1:{self.port}/_tunnel/register")
        factory.protocol = _Protocol
        factory.client = self
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(self.source, 0)).connect(factory)
        return await self._registered

    def _opened(self, proto: _Protocol) -> None:
        self.proto = proto
        if self.hello is not False:
            proto.sendMessage(json.dumps(self.hello).encode())

    def _message(self, message: dict) -> None:
        if "subdomains" in message and self.ack is None:
            self.offers.append(message["subdomains"])
            if self.answers_offers:
                self.proto.sendMessage(json.dumps({"subdomain": self.pick}).encode())
        elif "url" in message and self.ack is None:
            self.ack = message
            self._registered.callback(message)
        elif message.get("kind") == "request":
            self.requests.put(message)
        elif message.get("kind") == "cancel":
            self.cancels.put(message["id"])

    def _closed_with(self, code, reason) -> None:
        self.close_code = code
        if not self._registered.called:
            self._registered.errback(Closed(code, reason))
        self.closed.callback((code, reason))

    def send(self, message: dict) -> None:
        self.proto.sendMessage(json.dumps(message).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.proto.sendMessage(payload, isBinary=binary)

    def respond(self, request: dict, status: int = 200, body: bytes = b"", headers: dict | None = None) -> None:
        """A v0.1 (buffered) response."""
        self.send({"id": request["id"], "status": status, "headers": headers or {},
                   "body": base64.b64encode(body).decode()})

    def head(self, request: dict, status: int = 200, headers: dict | None = None) -> None:
        self.send({"kind": "response_head", "id": request["id"], "status": status, "headers": headers or {}})

    def chunk(self, request: dict, data: bytes, last: bool = False) -> None:
        self.send({"kind": "response_chunk", "id": request["id"], "data": base64.b64encode(data).decode(),
                   "last": last})

    async def close(self) -> None:
        if self.proto is not None and not self.closed.called:
            await close_cleanly(self.proto, self.closed)


async def refused(port: int, token: str | None, subdomain: str | None, source: str = "127.0.0.1") -> Closed:
    """The relay's refusal of this registration; fails the test if it was accepted instead."""
    gateway = LegacyGateway(port, token, subdomain, source=source)
    try:
        await gateway.connect()
    except Closed as e:
        return e
    await gateway.close()
    raise AssertionError(f"{subdomain} was given to {token} (from {source})")


def body_of(request: dict) -> bytes:
    return base64.b64decode(request["body"]) if request.get("body") else b""
