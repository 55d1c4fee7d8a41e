"""The relay's settings (`twist mcpr-relay`): its table and `[[relay.tokens]]`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mcpr.common.settings import (
    CONFIG_NAME,
    DEFAULT_MAX_BODY,
    ConfigError,
    Setting,
    array_of_tables,
    load,
    parse_count,
    parse_http_url,
    parse_list,
    parse_ping_seconds,
    parse_port,
    parse_seconds,
    parse_size,
    parse_text,
    show_value,
)
from mcpr.relay.auth import StaticToken, parse_static_token

RELAY_SETTINGS: tuple[Setting, ...] = (
    Setting("domain", parse_text, None, ("relay", "domain"), (("relay_domain",),)),
    Setting("port", parse_port, 8080, ("port",)),
    Setting("listen", parse_list(parse_text), (), ("relay", "listen")),
    Setting("auth_provider", parse_http_url, None, ("relay", "auth_provider"), (), "MCPR_AUTH_PROVIDER"),
    Setting("auth_provider_secret", parse_text, None, ("relay", "auth_provider_secret"), (),
            "MCPR_AUTH_PROVIDER_SECRET"),
    Setting("metrics", parse_text, None, ("relay", "metrics")),
    Setting("max_request_body", parse_size, DEFAULT_MAX_BODY, ("relay", "max_request_body")),
    Setting("max_in_flight", parse_count, 256, ("relay", "max_in_flight")),
    Setting("max_tunnels_per_token", parse_count, 8, ("relay", "max_tunnels_per_token")),
    Setting("max_message_size", parse_size, 4 << 20, ("relay", "max_message_size")),
    Setting("registration_timeout", parse_seconds, 10.0, ("relay", "registration_timeout")),
    Setting("headers_timeout", parse_seconds, 30.0, ("relay", "headers_timeout")),
    Setting("drain_timeout", parse_seconds, 30.0, ("relay", "drain_timeout")),
    Setting("ping_interval", parse_ping_seconds, 20.0, ("relay", "ping_interval")),
    Setting("ping_timeout", parse_ping_seconds, 10.0, ("relay", "ping_timeout")),
    Setting("public_url", parse_text, None, ("relay", "public_url"), option="public-url"),
)

RELAY_SHARED_KEYS: tuple[tuple[str, ...], ...] = (
    ("mode",), ("relay", "tokens"), ("mcp",), ("widgets",), ("no_tunnel",), ("tunnel",), ("csp",),
    ("relay_url",), ("tunnel_token",), ("tunnel_subdomain",), ("listen",), ("events",),
    ("upstream_timeout",), ("max_request_body",),
)


@dataclass(frozen=True)
class RelaySettings:
    domain: str
    listen: tuple[str, ...]
    tokens: tuple[StaticToken, ...]
    auth_provider: str | None
    auth_provider_secret: str | None
    metrics: str | None
    max_request_body: int
    max_in_flight: int
    max_tunnels_per_token: int
    max_message_size: int
    registration_timeout: float
    headers_timeout: float
    drain_timeout: float
    ping_interval: float
    ping_timeout: float
    public_url: str
    config_path: Path | None
    warnings: tuple[str, ...] = ()

    @property
    def auth_mode(self) -> str:
        if self.tokens:
            return "static"
        return "provider" if self.auth_provider else "open"


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_domain(value: Any) -> str:
    text = parse_text(value).lower().rstrip(".")
    if not _DOMAIN.match(text):
        raise ValueError("expected a DNS name such as tunnel.example.com")
    return text


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


def load_relay(
    cli: Mapping[str, Any],
    static_tokens: Sequence[str] = (),
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> RelaySettings:
    loaded = load(RELAY_SETTINGS, cli, config=config, env=env, cwd=cwd, known=RELAY_SHARED_KEYS)
    v = loaded.values
    source = str(loaded.path) if loaded.path else CONFIG_NAME
    mode = loaded.document.get("mode")
    if loaded.path is not None and mode not in (None, "relay"):
        raise ConfigError(f"{source}: key 'mode': expected \"relay\" for `twist mcpr-relay`, got {show_value(mode)}")
    if v["domain"] is None:
        raise ConfigError(f"no relay domain: pass --domain D (or set [relay] domain in {CONFIG_NAME})")
    try:
        domain = parse_domain(v["domain"])
    except ValueError as e:
        raise ConfigError(f"relay domain: {e}, got {show_value(v['domain'])}") from None
    tokens = _file_tokens(loaded.document, source)
    for spec in static_tokens:
        try:
            tokens.append(parse_static_token(spec))
        except ValueError as e:
            raise ConfigError(f"option --static-token: {e}") from None
    if v["auth_provider_secret"] and not v["auth_provider"]:
        raise ConfigError("--auth-provider-secret is set but --auth-provider is not")
    if cli.get("port") is not None and cli.get("listen"):
        raise ConfigError("--port and --listen both given: use --listen tcp:N alone")
    warnings = list(loaded.warnings)
    if tokens and v["auth_provider"]:
        warnings.append("static tokens are configured, so --auth-provider is not consulted")
    listen = v["listen"] or (f"tcp:{v['port']}",)
    public_url = v["public_url"] or f"https://*.{domain}"
    if public_url.count("*") != 1 or not public_url.startswith(("http://", "https://")):
        raise ConfigError(f"public_url: expected a URL with one '*' for the subdomain, e.g. https://*.{domain}, "
                          f"got {show_value(public_url)}")
    return RelaySettings(
        domain=domain,
        listen=listen,
        tokens=tuple(tokens),
        auth_provider=v["auth_provider"],
        auth_provider_secret=v["auth_provider_secret"],
        metrics=v["metrics"],
        max_request_body=v["max_request_body"],
        max_in_flight=v["max_in_flight"],
        max_tunnels_per_token=v["max_tunnels_per_token"],
        max_message_size=v["max_message_size"],
        registration_timeout=v["registration_timeout"],
        headers_timeout=v["headers_timeout"],
        drain_timeout=v["drain_timeout"],
        ping_interval=v["ping_interval"],
        ping_timeout=v["ping_timeout"],
        public_url=public_url,
        config_path=loaded.path,
        warnings=tuple(warnings),
    )
