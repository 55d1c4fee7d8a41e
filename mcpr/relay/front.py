"""The relay's public HTTP side: route by Host, and answer for itself.

`<label>.<domain>` goes into that label's tunnel (`forwarding.py`); any other
host only gets the relay's own endpoints (`/healthz`, `/_tunnel/register`,
`/_tunnel/pool`, and a status page on the bare domain), so the relay can be
health-checked on 127.0.0.1 and registered with through any name that reaches it.
"""

from __future__ import annotations

import html
import json
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from mcpr import __version__
from mcpr.common.names import valid_label
from mcpr.common.protocol import REGISTER_PATH
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.pool import PoolResource, SocketPool


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
                 stats: RequestStats, register: IResource, *, public_url: str | None = None,
                 public_url_set: bool = False, cluster: Callable[[], dict[str, Any]] | None = None) -> None:
        """`public_url` is the tunnels' URL template (default `https://*.<domain>`); `public_url_set`
        whether the operator configured it, in which case it also says how gateways reach the relay;
        `cluster` describes this node's part in a cluster for /healthz (its `registry` "up" or "down")."""
        super().__init__()
        self._clock = clock
        self.domain = domain
        self._public_url = public_url or f"https://*.{domain}"
        self._public_url_set = public_url_set
        self._registry = registry
        self._forwarder = forwarder
        self._stats = stats
        self._started = clock.seconds()
        self._cluster = cluster
        self._health = _Page(self._health_json)
        self._status = _Page(self._status_html)
        self._tunnel_dir = Resource()
        self._tunnel_dir.putChild(b"register", register)
        self._tunnel_dir.putChild(b"pool", PoolResource(self._pool_of))

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

    def _pool_of(self, subdomain: str) -> SocketPool | None:
        return getattr(self._registry.get(subdomain), "pool", None)

    def health(self) -> dict[str, Any]:
        """Always answered 200, even degraded: a load balancer that took every node out of service
        because their shared Redis is down would stop the tunnels they still serve."""
        health: dict[str, Any] = {
            "status": "draining" if self._forwarder.draining else "ok",
            "domain": self.domain,
            "tunnels": len(self._registry),
            "in_flight": self._stats.in_flight,
            "uptime_s": round(self._clock.seconds() - self._started, 3),
            "version": __version__,
        }
        if self._cluster is not None:
            cluster = health["cluster"] = self._cluster()
            if cluster["registry"] != "up" and health["status"] == "ok":
                health["status"] = "degraded"
        return health

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

    def registration_url(self, request: Request) -> str:
        """Where gateways register, as this request shows the relay to be reached.

        A configured public URL template says it (`https://*.tunnel.example.com` →
        `wss://tunnel.example.com/_tunnel/register`); else the request does: its scheme (TLS here,
        or a trusted proxy's `X-Forwarded-Proto`) and its Host, port included, as the client used it.
        """
        parts = urlsplit(self._public_url)
        secure, host = request.isSecure(), request.getHeader(b"host")
        if getattr(request.channel, "peer_trusted", False):
            proto, forwarded_host = request.getHeader(b"x-forwarded-proto"), request.getHeader(b"x-forwarded-host")
            secure = secure or (proto or b"").split(b",")[0].strip().lower() == b"https"
            host = forwarded_host.split(b",")[0].strip() if forwarded_host else host
        netloc = host.decode("latin-1") if host else self.domain
        if self._public_url_set:
            secure = parts.scheme == "https"
            if parts.netloc.startswith("*."):
                netloc = parts.netloc[2:]
        return f"{'wss' if secure else 'ws'}://{netloc}{REGISTER_PATH}"

    def _status_html(self, request: Request) -> bytes:
        h = self.health()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        domain = html.escape(self.domain)
        served = html.escape(self._public_url).replace("*", "&lt;name&gt;", 1)
        return (
            "<!doctype html><meta charset=utf-8><title>mcpr relay</title>"
            f"<h1>mcpr relay for {domain}</h1>"
            f"<p>{h['tunnels']} tunnel(s) connected, {h['in_flight']} request(s) in flight, "
            f"up {h['uptime_s']:.0f} s, version {html.escape(__version__)}.</p>"
            f"<p>Gateways connect to <code>{html.escape(self.registration_url(request))}</code> "
            f"(<code>twist mcpr --relay-url URL</code> takes this URL as it is) and are served at "
            f"<code>{served}</code>.</p>"
        ).encode()
