"""Which headers cross a hop, and the `X-Forwarded-*` trio each hop adds.

Hop-by-hop headers describe one connection and must not be replayed on the
next (RFC 9110 §7.6.1): the fixed list, plus whatever a `Connection` header
names.  Both daemons are hops (relay → gateway → upstream), so both use these
rules; everything else, repeated headers included, passes untouched so that
sessions (`Mcp-Session-Id`), auth and cookies keep working.
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


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The header names a `Connection` header declares hop-by-hop."""
    values = headers.getRawHeaders(b"connection") or ()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def content_length(values: list[bytes]) -> int:
    """The one length a message's `Content-Length` field lines declare (RFC 9110 §8.6: a list of
    equal values is that value), or ValueError saying what is wrong with them."""
    lengths = {part.strip() for value in values for part in value.split(b",")}
    if len(lengths) != 1:
        raise ValueError("contradictory content-length")
    (length,) = lengths
    if not length.isdigit() or len(length) > 18:
        raise ValueError("invalid content-length")
    return int(length)


# HOP_BY_HOP with each caller's own `drop` (a constant of the caller's), made once rather than on
# every request; bounded, in case a caller ever passes sets made on the fly.
_DROPPED: dict[frozenset[bytes], frozenset[bytes]] = {}


def end_to_end(source: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of `source` without hop-by-hop headers, those `Connection` names, and `drop`."""
    out = Headers()
    dropped = _DROPPED.get(drop)
    if dropped is None:
        dropped = HOP_BY_HOP | drop
        if len(_DROPPED) < 64:
            _DROPPED[drop] = dropped
    if source.hasHeader(b"connection"):
        dropped = dropped | connection_tokens(source)
    for name, values in source.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, values)
    return out


def add_forwarded(headers: Headers, *, client_ip: str | None, host: bytes | None, proto: bytes) -> None:
    """Append the client to `X-Forwarded-For`; set `X-Forwarded-Host/-Proto` unless a hop in
    front already did (it saw the public side, which this hop cannot)."""
    if client_ip:
        prior = headers.getRawHeaders(b"x-forwarded-for")
        value = client_ip.encode()
        headers.setRawHeaders(b"x-forwarded-for", [b", ".join([*prior, value]) if prior else value])
    if host and not headers.hasHeader(b"x-forwarded-host"):
        headers.setRawHeaders(b"x-forwarded-host", [host])
    if not headers.hasHeader(b"x-forwarded-proto"):
        headers.setRawHeaders(b"x-forwarded-proto", [proto])
