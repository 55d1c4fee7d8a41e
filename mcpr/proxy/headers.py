"""Which headers cross the proxy, in each direction.

Hop-by-hop headers describe one connection and must not be replayed on the
next (RFC 9110 §7.6.1); everything else, repeated headers included, passes
untouched so that sessions (`Mcp-Session-Id`), auth and cookies keep working.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers the proxy recomputes: the Agent sets Host and Content-Length
# from the upstream URL and the body producer.
_REQUEST_RECOMPUTED = frozenset({b"host", b"content-length", b"expect"})


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    values = headers.getRawHeaders(b"connection") or ()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def _copy(source: Headers, drop: frozenset[bytes]) -> Headers:
    out = Headers()
    dropped = drop | _connection_tokens(source)
    for name, values in source.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, values)
    return out


def upstream_request_headers(
    source: Headers, *, client_ip: str | None, host: bytes | None, proto: bytes
) -> Headers:
    """The headers to send upstream: end-to-end ones plus the X-Forwarded-* trio.

    X-Forwarded-Host/-Proto already set by a hop in front of us (the relay)
    describe the public side better than we can, so they are kept.
    """
    out = _copy(source, HOP_BY_HOP | _REQUEST_RECOMPUTED)
    if client_ip:
        prior = out.getRawHeaders(b"x-forwarded-for")
        value = client_ip.encode()
        out.setRawHeaders(b"x-forwarded-for", [b", ".join([*prior, value]) if prior else value])
    if host and not out.hasHeader(b"x-forwarded-host"):
        out.setRawHeaders(b"x-forwarded-host", [host])
    if not out.hasHeader(b"x-forwarded-proto"):
        out.setRawHeaders(b"x-forwarded-proto", [proto])
    return out


def downstream_response_headers(source: Headers) -> Headers:
    """The upstream response's end-to-end headers.  Twisted's client keeps Content-Length out of
    them; the caller sets it again when the body passes unchanged (see `response.length`)."""
    return _copy(source, HOP_BY_HOP | {b"content-length"})
