"""OAuth and discovery URLs moved from the upstream's origin to the public one.

An MCP client finds a server's authorization through URLs the server
publishes: `WWW-Authenticate: Bearer resource_metadata="..."` on a 401, then
the protected-resource metadata (RFC 9728) and the authorization server's
metadata (RFC 8414, OpenID discovery).  A server behind the proxy names its own
origin there (`http://localhost:9000/...`), which the client cannot reach and
which fails the check that the `resource` matches the URL the client used.
Only URLs on the upstream's exact origin move: another service on the same
machine (an authorization server on another port) is not behind this proxy.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

from mcpr.proxy.rewrite.csp import is_local_host
from mcpr.proxy.routing import Upstream

_DISCOVERY_PREFIXES = (
    b"/.well-known/oauth-protected-resource",
    b"/.well-known/oauth-authorization-server",
    b"/.well-known/openid-configuration",
)
_OPENID_SUFFIX = b"/.well-known/openid-configuration"  # OpenID appends it to an issuer's path

_RESOURCE_METADATA = re.compile(rb'(resource_metadata\s*=\s*)(?:"([^"]*)"|([^\s,]+))', re.IGNORECASE)


def is_discovery(path: bytes) -> bool:
    """Whether a request path asks for an OAuth or OpenID discovery document."""
    return path.startswith(_DISCOVERY_PREFIXES) or path.endswith(_OPENID_SUFFIX)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class OriginMap:
    """Replaces the upstream origin by the public origin at the start of URLs."""

    def __init__(self, upstream: Upstream, public_origin: str) -> None:
        self._scheme = "https" if upstream.secure else "http"
        self._port = upstream.port
        host = upstream.host.lower()
        # A server on loopback may call itself by any loopback name.
        self._hosts = {host, "localhost", "127.0.0.1", "::1"} if is_local_host(host) else {host}
        self.public = public_origin.rstrip("/")

    def url(self, value: str) -> str | None:
        """`value` on the public origin if it is a URL on the upstream's origin, else None."""
        if not value.startswith(("http://", "https://")) or any(c in value for c in "\t\r\n"):
            return None  # urlsplit would silently drop those characters
        try:
            parts = urlsplit(value)
            port = parts.port or _default_port(parts.scheme)
        except ValueError:
            return None
        if parts.scheme != self._scheme or port != self._port or (parts.hostname or "") not in self._hosts:
            return None
        rest = value[len(parts.scheme) + 3 + len(parts.netloc):]
        return self.public + rest

    def document(self, value: Any) -> bool:
        """Rewrite, in place, every string of a JSON document that is a URL on the upstream origin."""
        changed = False
        items: list[tuple[Any, Any]]
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            return False
        for key, item in items:
            if isinstance(item, str):
                moved = self.url(item)
                if moved is not None and moved != item:
                    value[key] = moved
                    changed = True
            else:
                changed |= self.document(item)
        return changed

    def headers(self, headers: Headers) -> None:
        """`WWW-Authenticate`'s `resource_metadata` and a redirect's `Location`, in place."""
        challenges = headers.getRawHeaders(b"www-authenticate")
        if challenges:
            headers.setRawHeaders(b"www-authenticate", [self._challenge(c) for c in challenges])
        location = headers.getRawHeaders(b"location")
        if location:
            headers.setRawHeaders(b"location", [self._bytes_url(v) for v in location])

    def _bytes_url(self, value: bytes) -> bytes:
        moved = self.url(value.decode("latin-1"))
        return value if moved is None else moved.encode("latin-1")

    def _challenge(self, value: bytes) -> bytes:
        def replace(match: re.Match[bytes]) -> bytes:
            quoted, bare = match.group(2), match.group(3)
            url = self._bytes_url(quoted if quoted is not None else bare)
            return match.group(1) + (b'"' + url + b'"' if quoted is not None else url)

        return _RESOURCE_METADATA.sub(replace, value)
