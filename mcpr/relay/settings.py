"""The relay's settings (`twist mcpr-relay`): its table and `[[relay.tokens]]`."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from mcpr.common.settings import (
    CONFIG_NAME,
    DEFAULT_MAX_BODY,
    ConfigError,
    Setting,
    array_of_tables,
    listen_endpoints,
    load,
    parse_choice,
    parse_count,
    parse_http_url,
    parse_list,
    parse_ping_seconds,
    parse_pool_size,
    parse_port,
    parse_seconds,
    parse_size,
    parse_text,
    show_value,
)
from mcpr.relay.auth import StaticToken, parse_static_token
from mcpr.relay.cluster.directory import parse_redis_url
from mcpr.relay.cluster.peers import parse_secret

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_domain(value: Any) -> str:
    text = parse_text(value).lower().rstrip(".")
    if not _DOMAIN.match(text):
        raise ValueError("expected a DNS name such as tunnel.example.com")
    return text


def parse_network(value: Any) -> str:
    """An IP address or CIDR network (host bits allowed: 10.0.0.1/8 is 10.0.0.0/8)."""
    try:
        return str(ipaddress.ip_network(parse_text(value), strict=False))
    except ValueError:
        raise ValueError("expected an IP address or network, e.g. 10.0.0.0/8 or 2001:db8::/32") from None


def parse_node_url(value: Any) -> str:
    """`http://ADDR:PORT` with an IP address that is loopback or private: the node listens there
    for requests from the other nodes, which must never be reachable from the internet."""
    text = parse_text(value).rstrip("/")
    parts = urlsplit(text)
    fix = "expected http://ADDR:PORT with a loopback or private IP address, e.g. http://10.0.0.5:7000"
    try:
        port = parts.port
        address = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        raise ValueError(fix) from None
    if parts.scheme != "http" or port is None or parts.path or parts.query or parts.username:
        raise ValueError(fix)
    if not (address.is_loopback or address.is_private) or address.is_unspecified:
        raise ValueError(f"{address} is not a loopback or private address: {fix}")
    return text


def _parse_static_tokens(specs: Any) -> tuple[StaticToken, ...]:
    """`--static-token` specs; the table marks them secret, so an error never repeats a token."""
    return tuple(parse_static_token(spec) for spec in specs)


# The relay's settings, each declared once: `twist mcpr-relay`'s options, the keys of its config
# file, the environment variables and the defaults all come from here.
RELAY_SETTINGS: tuple[Setting, ...] = (
    Setting("domain", parse_domain, None, ("relay", "domain"), legacy=(("relay_domain",),),
            help="Base domain, e.g. tunnel.example.com (alias --relay-domain).",
            aliases=(("relay-domain", "Alias of --domain (the original mcpr's spelling)."),)),
    Setting("port", parse_port, 8080, ("port",), help="Shorthand for --listen tcp:N (default 8080)."),
    Setting("listen", parse_list(parse_text), (), ("relay", "listen"), repeatable=True,
            help="Endpoint to serve on (repeatable): tcp:8080, or tls:/etc/mcpr/certs:port=443 "
                 "(SNI over a PEM directory), or reuseport:8080 (a port shared by several relay "
                 "processes; tls:...:reuseport=yes likewise)."),
    Setting("static_tokens", _parse_static_tokens, (), option="static-token", repeatable=True, secret=True,
            help="TOKEN:PATTERN[,PATTERN] a gateway may register with (repeatable)."),
    Setting("auth_provider", parse_http_url, None, ("relay", "auth_provider"), env="MCPR_AUTH_PROVIDER",
            help="Auth provider base URL (env MCPR_AUTH_PROVIDER)."),
    Setting("auth_provider_secret", parse_text, None, ("relay", "auth_provider_secret"),
            env="MCPR_AUTH_PROVIDER_SECRET", secret=True,
            help="X-Relay-Secret for the provider (env MCPR_AUTH_PROVIDER_SECRET)."),
    Setting("metrics", parse_text, None, ("relay", "metrics"),
            help="Endpoint for Prometheus metrics, e.g. tcp:9100:interface=127.0.0.1."),
    Setting("access_log", parse_choice("-", "off"), "-", ("relay", "access_log"),
            help="Where the access log (a line per public request) goes: - (standard output, the "
                 "default) or off."),
    Setting("max_request_body", parse_size, DEFAULT_MAX_BODY, ("relay", "max_request_body"),
            help="Largest public request body (default 16MiB; 413 above)."),
    Setting("max_in_flight", parse_count, 256, ("relay", "max_in_flight"),
            help="Concurrent requests per tunnel (default 256; 503 above)."),
    Setting("max_tunnels_per_token", parse_count, 8, ("relay", "max_tunnels_per_token"),
            help="Tunnels one token may hold (default 8; close 4008 above)."),
    # Who may hold which name, and how many registrations a stranger can make (docs/protocol.md,
    # "Names and ownership").
    Setting("max_tunnels_per_ip", parse_count, 32, ("relay", "max_tunnels_per_ip"),
            help="Tunnels registered from one IPv4 address or IPv6 /64 (default 32; close 4008 above)."),
    Setting("max_tunnels", parse_count, 10_000, ("relay", "max_tunnels"),
            help="Tunnels the relay holds in all (default 10000; close 4008 above)."),
    Setting("registration_rate", parse_count, 30, ("relay", "registration_rate"),
            help="Registrations per minute one address may start once its burst is used "
                 "(default 30; close 4008 above)."),
    Setting("registration_burst", parse_count, 30, ("relay", "registration_burst"),
            help="Registrations one address may start at once (default 30)."),
    Setting("reservation_grace", parse_seconds, 600.0, ("relay", "reservation_grace"),
            help="Seconds a subdomain stays reserved for its last owner after its tunnel drops "
                 "(default 600; others get 4003)."),
    Setting("max_reservations", parse_count, 50_000, ("relay", "max_reservations"),
            help="Reservations kept at most (default 50000; beyond, the one closest to its end ends early)."),
    Setting("state_dir", parse_text, None, ("relay", "state_dir"), env="MCPR_STATE_DIR",
            help="Directory for the reservations file (env MCPR_STATE_DIR; default $STATE_DIRECTORY as set "
                 "by systemd, else $XDG_STATE_HOME/mcpr-relay, i.e. ~/.local/state/mcpr-relay)."),
    Setting("max_message_size", parse_size, 4 << 20, ("relay", "max_message_size"),
            help="Largest WebSocket message from a gateway (default 4MiB)."),
    Setting("registration_timeout", parse_seconds, 10.0, ("relay", "registration_timeout"),
            help="Seconds a new socket has to register (default 10)."),
    Setting("headers_timeout", parse_seconds, 60.0, ("relay", "headers_timeout"),
            help="Seconds to wait for a tunnel's response headers (default 60; 504). Keep it above the "
                 "gateways' upstream_timeout (30), so that a slow upstream gets their JSON-RPC error."),
    Setting("drain_timeout", parse_seconds, 30.0, ("relay", "drain_timeout"),
            help="Seconds to let in-flight requests finish on stop (default 30)."),
    Setting("ping_interval", parse_ping_seconds, 20.0, ("relay", "ping_interval"),
            help="Seconds between WebSocket pings (default 20)."),
    Setting("ping_timeout", parse_ping_seconds, 10.0, ("relay", "ping_timeout"),
            help="Seconds to wait for a pong before dropping a tunnel (default 10)."),
    Setting("public_url", parse_text, None, ("relay", "public_url"),
            help="Public URL template of tunnels (default https://*.<domain>)."),
    # What one gateway's socket may cost the relay (mcpr/relay/tunnels/guard.py).
    Setting("control_frame_rate", parse_count, 1000, ("relay", "control_frame_rate"),
            help="Control frames a gateway may send per second, with a burst of as many: HTTP/2 PING, "
                 "SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM, empty DATA..., legacy messages without "
                 "data, WebSocket pings (default 1000; GOAWAY ENHANCE_YOUR_CALM and close 1008 above)."),
    Setting("tunnel_pool", parse_pool_size, 64, ("relay", "tunnel_pool"),
            help="Pooled sockets a gateway may open beside its tunnel: plain HTTP/1.1 connections that "
                 "carry one request at a time, cheaper than the tunnel's HTTP/2 streams. It opens 4 and "
                 "more as its concurrency needs (default 64, the most; 0 turns them off)."),
    Setting("gateway_backlog", parse_size, 1 << 20, ("relay", "gateway_backlog"),
            help="Bytes the relay may queue for a gateway that does not read, beyond its socket buffer "
                 "(default 1MiB; the socket is dropped above). Request bodies and new requests wait instead."),
    # The public front's defences against slow and greedy clients, and whom it believes
    # (mcpr/common/web.py, mcpr/relay/forwarding.py; docs/limits.md).
    Setting("client_header_timeout", parse_seconds, 30.0, ("relay", "client_header_timeout"),
            help="Seconds a public connection has to send a request's head, from when it is ready for one "
                 "(default 30; 408, or a silent close if it sent nothing)."),
    Setting("client_body_timeout", parse_seconds, 30.0, ("relay", "client_body_timeout"),
            help="Longest pause in a public request body, and the grace before --min-body-rate applies "
                 "(default 30; 408)."),
    Setting("min_body_rate", parse_size, 1024, ("relay", "min_body_rate"),
            help="Bytes per second a public request body must average once --client-body-timeout has passed "
                 "(default 1KiB; 408)."),
    Setting("max_connections_per_ip", parse_count, 256, ("relay", "max_connections_per_ip"),
            help="Public connections one IP address (an IPv6 /64) may hold; trusted proxies are exempt "
                 "(default 256; more are closed at once)."),
    Setting("max_connections", parse_count, None, ("relay", "max_connections"),
            help="Public connections in all (default: the limit on open files, less a reserve); at the cap the "
                 "oldest idle one is closed to make room, else the new one."),
    Setting("trusted_proxies", parse_list(parse_network), (), ("relay", "trusted_proxies"), repeatable=True,
            option="trusted-proxy",
            help="Address or CIDR of a front proxy whose X-Forwarded-*/Forwarded headers are kept and "
                 "extended, and which --max-connections-per-ip does not cap (repeatable)."),
    Setting("lingering_time", parse_seconds, 5.0, ("relay", "lingering_time"),
            help="Seconds a refused request's remaining bytes are read and dropped before its connection "
                 "closes, so the client reads the answer (default 5)."),
    Setting("lingering_size", parse_size, 64 << 20, ("relay", "lingering_size"),
            help="Bytes read and dropped that way at most (default 64MiB)."),
    # Several relay nodes behind one wildcard name, sharing a Redis registry (docs/cluster.md).
    Setting("cluster", parse_redis_url, None, ("relay", "cluster", "redis"), env="MCPR_CLUSTER", secret=True,
            help="Join a cluster of relays whose registry is this Redis: redis://[:PASSWORD@]HOST[:PORT][/DB] "
                 "(env MCPR_CLUSTER); needs --node-url and --cluster-secret."),
    Setting("node_url", parse_node_url, None, ("relay", "cluster", "node_url"),
            help="Where the other nodes reach this one's internal listener: http://ADDR:PORT with a "
                 "loopback or private address (the relay listens there)."),
    Setting("cluster_secret", parse_secret, None, ("relay", "cluster", "secret"), env="MCPR_CLUSTER_SECRET",
            secret=True,
            help="Secret shared by the cluster's nodes, sent on every request between them (env "
                 "MCPR_CLUSTER_SECRET; 16 visible ASCII characters or more, e.g. `openssl rand -hex 32`)."),
    Setting("cluster_ttl", parse_seconds, 15.0, ("relay", "cluster", "ttl"),
            help="Seconds a node's claim on a name lasts in Redis unless refreshed (default 15): how long "
                 "the names of a node that died point to it."),
)

RELAY_SHARED_KEYS: tuple[tuple[str, ...], ...] = (
    ("mode",), ("relay", "tokens"), ("mcp",), ("widgets",), ("no_tunnel",), ("tunnel",), ("csp",),
    ("relay_url",), ("tunnel_token",), ("tunnel_subdomain",), ("listen",), ("events",),
    ("upstream_timeout",), ("max_request_body",),
)


@dataclass(frozen=True)
class RelaySettings:
    """The table's values (less `port` and `static_tokens`, which only shape `listen` and
    `tokens`) and what is read beside it."""

    domain: str
    listen: tuple[str, ...]
    tokens: tuple[StaticToken, ...]
    auth_provider: str | None
    auth_provider_secret: str | None
    metrics: str | None
    access_log: str
    max_request_body: int
    max_in_flight: int
    max_tunnels_per_token: int
    max_tunnels_per_ip: int
    max_tunnels: int
    registration_rate: int
    registration_burst: int
    reservation_grace: float
    max_reservations: int
    state_dir: Path
    max_message_size: int
    registration_timeout: float
    headers_timeout: float
    drain_timeout: float
    ping_interval: float
    ping_timeout: float
    public_url: str
    control_frame_rate: int
    gateway_backlog: int
    tunnel_pool: int
    client_header_timeout: float
    client_body_timeout: float
    min_body_rate: int
    max_connections_per_ip: int
    max_connections: int | None
    trusted_proxies: tuple[str, ...]
    lingering_time: float
    lingering_size: int
    cluster: str | None
    node_url: str | None
    cluster_secret: str | None
    cluster_ttl: float
    config_path: Path | None
    warnings: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)  # `Loaded.sources`
    public_url_set: bool = False  # public_url was configured, not the default

    @property
    def auth_mode(self) -> str:
        if self.tokens:
            return "static"
        return "provider" if self.auth_provider else "open"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """systemd's `StateDirectory=` (the first, if several), else the XDG state directory: a
    relay run by hand keeps its reservations per user, outside any source tree."""
    systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(xdg):  # the XDG spec: a relative path is invalid and ignored
        xdg = os.path.join(env.get("HOME") or str(Path.home()), ".local", "state")
    return Path(xdg) / "mcpr-relay"


def _file_tokens(document: Mapping[str, Any], source: str) -> list[StaticToken]:
    out = []
    for where, entry in array_of_tables(document, ("relay", "tokens"), source, ("token", "subdomains"),
                                         "token and subdomains"):
        token = entry.get("token")
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"{where}.token': expected a non-empty string")
        subdomains = entry.get("subdomains")
        if isinstance(subdomains, str):
            subdomains = [subdomains]
        if not isinstance(subdomains, list) or not subdomains or not all(isinstance(s, str) for s in subdomains):
            raise ConfigError(f"{where}.subdomains': expected a non-empty list of subdomain patterns")
        try:
            out.append(StaticToken(token.strip(), tuple(s.strip() for s in subdomains)))
        except ValueError as e:
            raise ConfigError(f"{where}.subdomains': {e}") from None
    return out


def _check_cluster(v: Mapping[str, Any]) -> None:
    """The cluster's settings come together or not at all."""
    if v["cluster"] is None:
        stray = [name for name in ("node_url", "cluster_secret") if v[name] is not None]
        if stray:
            raise ConfigError(f"--{stray[0].replace('_', '-')} is set but --cluster is not: pass --cluster "
                              "redis://HOST:PORT/DB to join a cluster, or drop it")
        return
    if v["node_url"] is None:
        raise ConfigError("--cluster needs --node-url http://ADDR:PORT (where the other nodes reach this one)")
    if not v["cluster_secret"]:
        raise ConfigError("--cluster needs --cluster-secret (or MCPR_CLUSTER_SECRET): the same secret on every node")
    if v["cluster_ttl"] < 1:
        raise ConfigError(f"--cluster-ttl: expected 1 second or more, got {v['cluster_ttl']:g}")


def load_relay(
    cli: Mapping[str, Any],
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> RelaySettings:
    env = os.environ if env is None else env
    loaded = load(RELAY_SETTINGS, cli, config=config, env=env, cwd=cwd, known=RELAY_SHARED_KEYS,
                  secrets=[("relay", "tokens")])
    v = dict(loaded.values)
    source = str(loaded.path) if loaded.path else CONFIG_NAME
    mode = loaded.document.get("mode")
    if loaded.path is not None and mode not in (None, "relay"):
        raise ConfigError(f"{source}: key 'mode': expected \"relay\" for `twist mcpr-relay`, got {show_value(mode)}")
    if v["domain"] is None:
        raise ConfigError(f"no relay domain: pass --domain D (or set [relay] domain in {CONFIG_NAME})")
    tokens = (*_file_tokens(loaded.document, source), *v.pop("static_tokens"))
    if v["auth_provider_secret"] and not v["auth_provider"]:
        raise ConfigError("--auth-provider-secret is set but --auth-provider is not")
    v["listen"] = listen_endpoints(v, cli, "tcp:{port}")
    del v["port"]
    v["state_dir"] = Path(v["state_dir"]).expanduser() if v["state_dir"] else default_state_dir(env)
    warnings = list(loaded.warnings)
    if tokens and v["auth_provider"]:
        warnings.append("static tokens are configured, so --auth-provider is not consulted")
    _check_cluster(v)
    public_url_set = v["public_url"] is not None
    public_url = v["public_url"] = v["public_url"] or f"https://*.{v['domain']}"
    if public_url.count("*") != 1 or not public_url.startswith(("http://", "https://")):
        raise ConfigError(f"public_url: expected a URL with one '*' for the subdomain, e.g. https://*.{v['domain']}, "
                          f"got {show_value(public_url)}")
    return RelaySettings(**v, tokens=tokens, config_path=loaded.path, warnings=tuple(warnings),
                         sources=loaded.sources, public_url_set=public_url_set)
