"""Hypothesis: the relay's translation of a public request into a tunnel stream (S2).

Random request lines and header fields go through the real front in memory
(CappedChannel, RelayFront, TunnelForwarder).  Each request is either refused
with a 4xx before any tunnel sees it, or becomes a `TunnelRequest` that
HTTP/2 can carry: h2's `validate_outbound_headers` accepts the header block
the relay's `H2Tunnel` sends for it, and an h2 server (the gateway's end)
receives it as a request, on a connection that stays healthy.  And the split
is the right one: a request is accepted exactly when it is forwardable by the
rules of RFC 9110/9112 written out independently below (`forwardable`).
"""

from __future__ import annotations

import re

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, RequestReceived
from h2.utilities import HeaderValidationFlags, validate_headers, validate_outbound_headers
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.headers import HOP_BY_HOP
from mcpr.relay.tunnels.contract import TunnelRequest
from mcpr.relay.tunnels.guard import ControlBudget, Outbound
from mcpr.relay.tunnels.h2 import H2Tunnel
from tests.support.memory_relay import MemoryRelay, relay_settings

HOST = b"a.tunnel.test"
TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
OUTBOUND = HeaderValidationFlags(is_client=True, is_trailer=False, is_response_header=False, is_push_promise=False)
INBOUND = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)

def mostly(good, *odd):
    """`good` four times in five, else one of `odd` (one_of alone would weigh them all the same)."""
    return st.integers(0, 4).flatmap(lambda i: good if i else st.one_of(*odd))


tokens = st.text(TCHARS, min_size=1, max_size=12).map(str.encode)
visible = st.text("".join(map(chr, range(0x21, 0x7F))), max_size=24).map(str.encode)
# Mostly well-formed parts with a few bad bytes in them, plus the odd cases by name and raw bytes:
# about half of the requests pass.
methods = mostly(tokens,
                    st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT", b"TRACE", b"PATCH", b"get",
                                     b"PRI", b"", b"G T", b"G:T", b"G\x00T", b"\xc3\xa9"]),
                    st.binary(max_size=8))
authorities = st.sampled_from([HOST, b"A.Tunnel.Test", HOST + b":8443", HOST + b":", HOST + b".", b"u@" + HOST, b""])
targets = mostly(
    visible.map(lambda path: b"/" + path),
    st.builds(lambda path: b"/" + path, st.binary(max_size=24)),
    st.builds(lambda scheme, authority, rest: scheme + b"://" + authority + rest,
              st.sampled_from([b"http", b"HTTPS", b"ftp", b"http:"]), authorities,
              st.sampled_from([b"", b"/", b"/x?y=1", b"?q", b"#frag", b"/p#f", b"/a b", b"/\x7f"])),
    st.sampled_from([b"*", b"example.com:443", HOST + b":443", b"foo", b"", b"//x", b"/%00", b"/\x7f", b"/\x80",
                     b"/\xb0", b"/\xb1", b"/\xff"]),
    st.binary(max_size=24),
)
names = mostly(tokens,
                  st.sampled_from([b"Host", b"HOST", b"Connection", b"TE", b"Upgrade", b"Keep-Alive", b"Cookie",
                                   b"Proxy-Connection", b"X-Forwarded-For", b"Forwarded", b"Expect", b":path",
                                   b":authority", b"Authorization", b"X A", b"", b"X-\xe9"]),
                  st.binary(min_size=1, max_size=10))
field_text = st.text("".join(map(chr, range(0x20, 0x7F))) + "\t\xe9", max_size=24).map(lambda v: v.encode("latin-1"))
values = mostly(field_text,
                   st.sampled_from([b"close", b"trailers", b"upgrade, keep-alive", b" x ", b"100-continue", b"",
                                    b"a\tb", b"caf\xc3\xa9", b"a\x01b", b"\x7f", b"a\x00", b"a\nb", b"a\rb",
                                    b"te, host", b"host"]),
                   st.binary(max_size=24))
fields = st.lists(st.tuples(names, values), max_size=4)


def framing_field(name: bytes) -> bool:
    """Fields that would make the front wait for a body: framing has tests of its own."""
    parsed = name.split(b":", 1)[0].strip().lower()
    return parsed in (b"content-length", b"transfer-encoding")


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + HOST, *(n + b": " + v for n, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- what RFC 9110/9112 allow, written out independently of mcpr.common.web

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VISIBLE = re.compile(rb"[\x21-\x7e]+\Z")
_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff \t]*\Z")
_AUTHORITY = re.compile(rb"(?:[-A-Za-z0-9._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")


def forwardable(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    if not _TOKEN.match(method) or method in (b"CONNECT", b"TRACE"):
        return False
    if not _VISIBLE.match(target):
        return False
    if not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return False
        end = min([i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0], default=len(rest))
        authority, rest = rest[:end], rest[end:]
        if not authority or not _AUTHORITY.match(authority) or rest.startswith(b"#"):
            return False
    hosts = 1
    for line in (n + b": " + v for n, v in headers):
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or not _VALUE.match(value):
            return False
        hosts += name.lower() == b"host"
    return hosts == 1


class _Sink:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def head(self, status, headers) -> None: ...

    def data(self, chunk) -> None: ...

    def end(self) -> None: ...

    def fail(self, reason: str) -> None:
        self.failed.append(reason)

    def register(self, producer) -> None: ...


class TranslationFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = MemoryRelay(relay_settings(self))
        self.tunnel = self.relay.tunnel("a")

    def through_h2(self, request: TunnelRequest) -> list[tuple[bytes, bytes]]:
        """Send `request` on a real H2Tunnel to an h2 server; the header block the server received.
        The block the tunnel sends must pass h2's outbound validation as it is."""
        out: list[bytes] = []
        closes: list = []
        tunnel = H2Tunnel("a", "owner", out.append, lambda code, reason: closes.append((code, reason)),
                          budget=ControlBudget(1000, Clock()), outbound=Outbound(1 << 20))
        sent: list[list[tuple[bytes, bytes]]] = []
        send_headers = tunnel.conn.send_headers

        def spy(stream_id, headers, *args, **kwargs):
            sent.append(list(headers))
            return send_headers(stream_id, headers, *args, **kwargs)

        tunnel.conn.send_headers = spy  # type: ignore[method-assign]
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        tunnel.start()
        server.receive_data(b"".join(out))
        out.clear()
        tunnel.message(server.data_to_send(), True)
        sink = _Sink()
        tunnel.open_stream(request, sink)
        events = server.receive_data(b"".join(out))
        self.assertEqual((sink.failed, closes), ([], []))
        self.assertFalse([e for e in events if isinstance(e, ConnectionTerminated)])
        [block] = sent
        list(validate_outbound_headers(block, OUTBOUND))
        [received] = [e for e in events if isinstance(e, RequestReceived)]
        list(validate_headers(received.headers, INBOUND))
        return list(received.headers)

    @given(methods, targets, fields)
    def test_refused_or_carried_by_http2(self, method: bytes, target: bytes, headers) -> None:
        if any(b"\r\n" in part for part in (method, target, *(x for pair in headers for x in pair))):
            return  # a new line of the request, not a byte of this one
        if any(framing_field(name) or name[:1] in (b" ", b"\t") for name, _ in headers):
            return  # framing fields and obs-fold continuations have tests of their own
        client = self.relay.request_bytes(request_bytes(method, target, headers))
        streams, self.tunnel.streams[:] = list(self.tunnel.streams), []
        response = client.value().removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not streams:
            self.assertRegex(response[:13], rb"^HTTP/1\.1 4\d\d ", (method, target, headers, response[:200]))
            self.assertFalse(forwardable(method, target, headers), (method, target, headers, response[:200]))
            return
        self.assertTrue(forwardable(method, target, headers), (method, target, headers))
        self.assertEqual(response, b"")
        [stream] = streams
        request = stream.request
        self.assertRegex(request.path, rb"^/[\x21-\x7e]*\Z")
        names = [name for name, _ in request.headers]
        self.assertEqual([n for n in names if n == b"host"], [b"host"])
        self.assertTrue(all(_TOKEN.match(n) and n == n.lower() and n not in HOP_BY_HOP for n in names), names)
        received = dict(self.through_h2(request))
        self.assertEqual((received[b":method"], received[b":path"]), (method, request.path))
        self.assertEqual(received[b":authority"].lower().split(b":")[0].rstrip(b"."), HOST)
        stream.sink.head(204, [])
        stream.sink.end()
