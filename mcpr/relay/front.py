"""The relay's public HTTP side: route by Host, and answer for itself.

`<label>.<domain>` goes into that label's tunnel (`forwarding.py`); any other
host only gets the relay's own endpoints (`/healthz`, `/_tunnel/register`, and
a status page on the bare domain), so the relay can be health-checked on
127.0.0.1 and registered with through any name that reaches it.
"""

from __future__ import annotations

import html
import json
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from mcpr import __version__
from mcpr.common.names import valid_label
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry


def split_host(host: bytes | None, domain: str) -> tuple[str, str | None]:
    """("tunnel", label) for `<label>.<domain>`, ("bare", None) for the domain, else ("other", None)."""
    if not host:
        return "other", None
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return "other", None
    name = text.rsplit(":", 1)[0] if ":" in text else text
    name = name.rstrip(".")
    if name == domain:
        return "bare", None
    suffix = "." + domain
    if name.endswith(suffix):
        label = name[: -len(suffix)]
        if valid_label(label):
            return "tunnel", label
    return "other", None


class _Page(Resource):
    """One of the relay's own pages, rendered afresh for each GET (and HEAD)."""

    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        return self._render(request)


class RelayFront(Resource):
    """The root resource: picks a child by Host, then by path."""

    def __init__(self, clock: IReactorTime, domain: str, registry: Registry, forwarder: TunnelForwarder,
                 stats: RequestStats, register: IResource) -> None:
        super().__init__()
        self._clock = clock
        self.domain = domain
        self._registry = registry
        self._forwarder = forwarder
        self._stats = stats
        self._started = clock.seconds()
        self._health = _Page(self._health_json)
        self._status = _Page(self._status_html)
        self._tunnel_dir = Resource()
        self._tunnel_dir.putChild(b"register", register)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        kind, label = split_host(request.getHeader(b"host"), self.domain)
        if label is not None:  # a tunnel's host
            return self._forwarder.resource(label)
        if path == b"healthz":
            return self._health
        if path == b"_tunnel":
            return self._tunnel_dir
        if path == b"" and kind == "bare" and not request.postpath:
            return self._status
        return pages.notFound("Not Found", "No such tunnel or relay page.")

    def render(self, request: Request) -> Any:
        return self.getChildWithDefault(b"", request).render(request)

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self._forwarder.draining else "ok",
            "domain": self.domain,
            "tunnels": len(self._registry),
            "in_flight": self._stats.in_flight,
            "uptime_s": round(self._clock.seconds() - self._started, 3),
            "version": __version__,
        }

    def too_large(self, request: Request, method: bytes, path: bytes) -> None:
        """The body cap refused a request (CappedSite's report): counted and logged like any other."""
        kind, label = split_host(request.getHeader(b"host"), self.domain)
        self._stats.too_large(label, method, path)

    def refused(self, status: int, method: bytes, target: bytes, host: bytes | None, why: str) -> None:
        """The front refused a request before routing it (CappedSite's report): counted and logged."""
        kind, label = split_host(host, self.domain)
        self._stats.refused(label, status, method, target, why)

    def _health_json(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.health()).encode()

    def _status_html(self, request: Request) -> bytes:
        h = self.health()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        domain = html.escape(self.domain)
        return (
            "<!doctype html><meta charset=utf-8><title>mcpr relay</title>"
            f"<h1>mcpr relay for {domain}</h1>"
            f"<p>{h['tunnels']} tunnel(s) connected, {h['in_flight']} request(s) in flight, "
            f"up {h['uptime_s']:.0f} s, version {html.escape(__version__)}.</p>"
            f"<p>Gateways connect to <code>wss://{domain}/_tunnel/register</code> and are served at "
            f"<code>https://&lt;name&gt;.{domain}</code>.</p>"
        ).encode()
