"""Which headers the gateway passes upstream and back.

The hop rules are the shared ones (`mcpr.common.headers`); the proxy adds
what its upstream client recomputes itself.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from mcpr.common.headers import FieldLines, add_forwarded, end_to_end_lines, strip_to_end_to_end

# Request headers the proxy recomputes: the upstream client sets Host and Content-Length
# from the upstream URL and the body.
_REQUEST_RECOMPUTED = frozenset({b"host", b"content-length", b"expect"})


def upstream_request_headers(
    source: Headers, *, client_ip: str | None, host: bytes | None, proto: bytes
) -> FieldLines:
    """The headers to send upstream: end-to-end ones plus the X-Forwarded-* trio.

    X-Forwarded-Host/-Proto already set by a hop in front of us (the relay)
    describe the public side better than we can, so they are kept.
    """
    out = end_to_end_lines(source, _REQUEST_RECOMPUTED)
    add_forwarded(out, client_ip=client_ip, host=host, proto=proto)
    return out


_RESPONSE_RECOMPUTED = frozenset({b"content-length"})


def downstream_response_headers(source: Headers) -> Headers:
    """The upstream response's end-to-end headers, without Content-Length: the caller sets it
    again when the body passes unchanged (see `response.length`).  `source` itself, stripped:
    the upstream client made it for this response alone, and what reads it afterwards (the
    rewrite plan, the session id) reads end-to-end headers only."""
    return strip_to_end_to_end(source, _RESPONSE_RECOMPUTED)
