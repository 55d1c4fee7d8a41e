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


def _dropped(source: Headers, drop: frozenset[bytes]) -> frozenset[bytes]:
    """The lower-case names that do not cross: hop-by-hop ones, those `Connection` names, and `drop`."""
    dropped = _DROPPED.get(drop)
    if dropped is None:
        dropped = HOP_BY_HOP | drop
        if len(_DROPPED) < 64:
            _DROPPED[drop] = dropped
    if source.hasHeader(b"connection"):
        dropped = dropped | connection_tokens(source)
    return dropped


def end_to_end(source: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of `source` without hop-by-hop headers, those `Connection` names, and `drop`."""
    out = Headers()
    dropped = _dropped(source, drop)
    for name, values in source.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, values)
    return out


def strip_to_end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """`end_to_end` in place, for a table made for one message that nothing else reads as it was:
    a copy would check every value again."""
    dropped = _dropped(headers, drop)
    for name in [name for name, _ in headers.getAllRawHeaders() if name.lower() in dropped]:
        headers.removeHeader(name)
    return headers


FieldLines = list[tuple[bytes, bytes]]
"""A head's field lines in order, names lower-cased, as a hop that writes its head itself sends them."""


def end_to_end_lines(source: Headers, drop: frozenset[bytes] = frozenset()) -> FieldLines:
    """`end_to_end` as field lines, for the heads the daemons write themselves (a tunnel's, the
    gateway's upstream request).  `source`'s values were checked when it got them; a second
    `Headers` would check every one again (3 % of a proxied request's CPU)."""
    dropped = _dropped(source, drop)
    return [(lower, value) for name, values in source.getAllRawHeaders()
            if (lower := name.lower()) not in dropped for value in values]


def add_forwarded(lines: FieldLines, *, client_ip: str | None, host: bytes | None, proto: bytes) -> None:
    """Append the client to `X-Forwarded-For`; set `X-Forwarded-Host/-Proto` unless a hop in
    front already did (it saw the public side, which this hop cannot)."""
    names = {name for name, _ in lines}
    if client_ip:
        value = client_ip.encode()
        if b"x-forwarded-for" in names:
            prior = [v for n, v in lines if n == b"x-forwarded-for"]
            lines[:] = [line for line in lines if line[0] != b"x-forwarded-for"]
            value = b", ".join([*prior, value])
        lines.append((b"x-forwarded-for", value))
    if host and b"x-forwarded-host" not in names:
        lines.append((b"x-forwarded-host", host))
    if b"x-forwarded-proto" not in names:
        lines.append((b"x-forwarded-proto", proto))
