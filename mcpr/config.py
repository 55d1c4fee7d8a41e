"""Settings from `mcpr.toml`, the environment and the command line.

One table of `Setting`s per program says where each value may come from; one
merge function applies the priority CLI > environment > file > default, so the
two programs cannot drift apart in how they treat their inputs.  Every error
names the key and where the bad value came from, because a user reading
"invalid port" cannot tell which of three places to fix.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from mcpr.proxy.csp import CspPolicy, WidgetRule
from mcpr.relay.auth import StaticToken, parse_static_token

CONFIG_NAME = "mcpr.toml"


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; the message says which and where."""


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --- value parsers: each takes a raw value (TOML-typed or a string from the
# --- command line or environment) and raises ValueError("expected ...").


def parse_port(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("expected an integer 1-65535")
    return value


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("expected true or false")


def parse_seconds(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not 0 < seconds <= 86400:
        raise ValueError("expected a number of seconds between 0 and 86400")
    return seconds


def parse_ping_seconds(value: Any) -> float:
    """Autobahn schedules pings on whole-second buckets: shorter values fire at random early."""
    seconds = parse_seconds(value)
    if seconds < 1:
        raise ValueError("expected at least 1 second (WebSocket ping timers have 1-second granularity)")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_size(value: Any) -> int:
    """Bytes, as an integer or a string such as "16MiB" or "512k"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError('expected a positive size in bytes, e.g. 16777216 or "16MiB"')
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a positive integer")
    return value


def parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def parse_http_url(value: Any) -> str:
    text = parse_text(value) if isinstance(value, str) else None
    parts = urlsplit(text) if text else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts.port
    except ValueError:
        raise ValueError("expected an http:// or https:// URL with a valid port") from None
    return text


def parse_csp_source(value: Any) -> str:
    """A domain for a widget CSP (`https://api.example.com`, `*.cdn.example`); nothing that could
    end the directive or start another."""
    text = parse_text(value)
    if any(c.isspace() or c in ";,'\"" for c in text):
        raise ValueError("expected a domain or origin such as https://api.example.com")
    return text


def parse_origin(value: Any) -> str:
    """A public origin, `https://host[:port]`; a bare host name means https."""
    text = parse_text(value)
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    try:
        parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("expected an origin such as https://app.example.com")
    return f"{parts.scheme}://{parts.netloc}"


def parse_list(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    """A TOML array, a repeated CLI option, or a comma-separated string."""

    def parse(value: Any) -> tuple:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of strings")
        return tuple(item(v) for v in value)

    return parse


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(_show(c) for c in choices))
        return value

    return parse


# --- the merge


@dataclass(frozen=True)
class Setting:
    """One setting: its name in the settings mapping and where it may come from."""

    name: str
    parse: Callable[[Any], Any]
    default: Any = None
    path: tuple[str, ...] | None = None
    legacy: tuple[tuple[str, ...], ...] = ()
    env: str | None = None
    option: str | None = None


@dataclass(frozen=True)
class Loaded:
    values: dict[str, Any]
    path: Path | None
    document: dict[str, Any]
    warnings: tuple[str, ...]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def find_config(explicit: str | None, cwd: Path) -> Path | None:
    """`--config PATH`, else `mcpr.toml` in the current directory or its nearest parent."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {explicit}")
        return path
    for folder in (cwd, *cwd.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _lookup(document: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = document
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(document: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    for key, value in document.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path


def unknown_keys(document: Mapping[str, Any], known: Iterable[tuple[str, ...]]) -> list[str]:
    """Dotted names of keys nobody reads; anything under a known table path counts as read."""
    known = set(known)
    return [
        ".".join(path)
        for path in _flatten(document)
        if not any(path[:i] in known for i in range(1, len(path) + 1))
    ]


def merge(
    settings: Sequence[Setting],
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    document: Mapping[str, Any],
    source: str,
) -> dict[str, Any]:
    """Apply CLI > environment > file > default to every setting, validating each winner."""
    values: dict[str, Any] = {}
    for s in settings:
        raw, where = cli.get(s.name), f"option --{s.option or s.name.replace('_', '-')}"
        if raw is None and s.env and env.get(s.env):
            raw, where = env[s.env], f"environment variable {s.env}"
        if raw is None:
            for path in ((s.path,) if s.path else ()) + s.legacy:
                found = _lookup(document, path)
                if found is not None:
                    raw, where = found, f"{source}: key '{'.'.join(path)}'"
                    break
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}, got {_show(raw)}") from None
    return values


def load(
    settings: Sequence[Setting],
    cli: Mapping[str, Any],
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    known: Iterable[tuple[str, ...]] = (),
) -> Loaded:
    env = os.environ if env is None else env
    path = find_config(config, Path.cwd() if cwd is None else cwd)
    document = read_config(path)
    source = str(path) if path else CONFIG_NAME
    values = merge(settings, cli, env, document, source)
    paths = [p for s in settings for p in ((s.path,) if s.path else ()) + s.legacy]
    warnings = tuple(
        f"{source}: unknown key '{key}' (ignored)"
        for key in unknown_keys(document, [*paths, *known])
    )
    return Loaded(values, path, document, warnings)


# --- the gateway (`twist mcpr`)

DEFAULT_PORT = 3000
DEFAULT_MAX_BODY = 16 << 20

GATEWAY_SETTINGS: tuple[Setting, ...] = (
    Setting("mcp", parse_http_url, None, ("mcp",)),
    Setting("port", parse_port, DEFAULT_PORT, ("port",)),
    Setting("listen", parse_list(parse_text), (), ("listen",)),
    Setting("widgets", parse_text, None, ("widgets",)),
    Setting("csp_mode", parse_choice("extend", "override"), "extend", ("csp", "mode"), option="csp-mode"),
    Setting("csp_domains", parse_list(parse_csp_source), (), ("csp", "domains"), option="csp"),
    Setting("csp_domain", parse_origin, None, ("csp", "domain")),
    Setting("relay_url", parse_http_url, None, ("tunnel", "relay_url"), (("relay_url",),), "MCPR_RELAY_URL"),
    Setting("tunnel_enabled", parse_bool, True, ("tunnel", "enabled")),
    Setting("no_tunnel", parse_bool, False, ("no_tunnel",)),
    Setting("tunnel_token", parse_text, None, ("tunnel", "token"), (("tunnel_token",),), "MCPR_TUNNEL_TOKEN"),
    Setting("tunnel_subdomain", parse_text, None, ("tunnel", "subdomain"), (("tunnel_subdomain",),),
            "MCPR_TUNNEL_SUBDOMAIN", option="subdomain"),
    Setting("tunnel_ping_interval", parse_ping_seconds, 20.0, ("tunnel", "ping_interval")),
    Setting("tunnel_ping_timeout", parse_ping_seconds, 10.0, ("tunnel", "ping_timeout")),
    Setting("events", parse_text, None, ("events",)),
    Setting("upstream_timeout", parse_seconds, 30.0, ("upstream_timeout",)),
    Setting("max_request_body", parse_size, DEFAULT_MAX_BODY, ("max_request_body",)),
)

# Keys the gateway does not read but that may legitimately share its file.
SHARED_KEYS: tuple[tuple[str, ...], ...] = (("mode",), ("relay",), ("relay_domain",))
# Tables `load_gateway` reads itself, outside the settings table.
GATEWAY_TABLES: tuple[tuple[str, ...], ...] = (("csp", "widget"),)


@dataclass(frozen=True)
class GatewaySettings:
    mcp: str
    listen: tuple[str, ...]
    widgets: str | None
    csp_mode: str
    csp_domains: tuple[str, ...]
    csp_domain: str | None
    relay_url: str | None
    tunnel_token: str | None
    tunnel_subdomain: str | None
    tunnel_ping_interval: float
    tunnel_ping_timeout: float
    events: str | None
    upstream_timeout: float
    max_request_body: int
    config_path: Path | None
    csp_widgets: tuple[WidgetRule, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def tunnel(self) -> bool:
        return self.relay_url is not None

    @property
    def csp(self) -> CspPolicy:
        return CspPolicy(self.csp_mode, self.csp_domains, self.csp_domain, self.csp_widgets)


_WIDGET_DIRECTIVES = ("domains", "connect_domains", "resource_domains", "frame_domains")


def _array_of_tables(document: Mapping[str, Any], path: tuple[str, ...], source: str, keys: Iterable[str],
                     what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each `[[path]]` table with the prefix its errors start with; unknown keys are errors here,
    since a misspelt key in such a table silently changes what it grants."""
    entries = _lookup(document, path)
    if entries is None:
        return
    name = ".".join(path)
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: key '{name}': expected [[{name}]] tables")
    allowed = set(keys)
    for i, entry in enumerate(entries):
        where = f"{source}: key '{name}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}': expected a table with {what}")
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(f"{where}': unknown key(s) {', '.join(sorted(unknown))}")
        yield where, entry


def _csp_widgets(document: Mapping[str, Any], source: str) -> tuple[WidgetRule, ...]:
    """`[[csp.widget]]` entries: `match` (a glob on the widget URI), `mode`, and per-directive domains."""
    rules = []
    for where, entry in _array_of_tables(document, ("csp", "widget"), source,
                                         ("match", "mode", *_WIDGET_DIRECTIVES), "match and domains"):
        values: dict[str, Any] = {}
        for key, parse in (("match", parse_text), ("mode", parse_choice("extend", "override")),
                           *((d, parse_list(parse_csp_source)) for d in _WIDGET_DIRECTIVES)):
            if key in entry:
                try:
                    values[key] = parse(entry[key])
                except ValueError as e:
                    raise ConfigError(f"{where}.{key}': {e}, got {_show(entry[key])}") from None
        if "match" not in values:
            raise ConfigError(f"{where}.match': expected a glob on the widget URI, e.g. \"ui://widget/*\"")
        both = values.get("domains", ())
        rules.append(WidgetRule(values["match"], values.get("mode"),
                                connect=both + values.get("connect_domains", ()),
                                resource=both + values.get("resource_domains", ()),
                                frame=values.get("frame_domains", ())))
    return tuple(rules)


def _widgets_source(value: str | None, from_cli: bool, source: str, config_path: Path | None,
                    cwd: Path) -> str | None:
    """`widgets`: a dev server URL as is, or a folder made absolute (a path in the file is
    relative to the file, one on the command line to the working directory)."""
    if value is None:
        return None
    from_file = not from_cli and config_path is not None
    where = f"{source}: key 'widgets'" if from_file else "option --widgets"
    if value.startswith(("http://", "https://")):
        try:
            return parse_http_url(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}, got {_show(value)}") from None
    folder = ((config_path.parent if from_file and config_path else cwd) / value).resolve()
    if not folder.is_dir():
        raise ConfigError(f"{where}: expected a widget dev server URL or a folder, no such folder: {folder}")
    return str(folder)


def load_gateway(
    cli: Mapping[str, Any],
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> GatewaySettings:
    cwd = Path.cwd() if cwd is None else cwd
    loaded = load(GATEWAY_SETTINGS, cli, config=config, env=env, cwd=cwd, known=SHARED_KEYS + GATEWAY_TABLES)
    v = loaded.values
    source = str(loaded.path) if loaded.path else CONFIG_NAME
    mode = loaded.document.get("mode")
    if mode == "relay":
        raise ConfigError(f"{source}: key 'mode': this file configures a relay; run `twist mcpr-relay`")
    if mode not in (None, "gateway"):
        raise ConfigError(f"{source}: key 'mode': expected \"gateway\" or \"relay\", got {_show(mode)}")
    if v["mcp"] is None:
        raise ConfigError(f"no MCP server URL: pass --mcp URL or set 'mcp' in {CONFIG_NAME}")
    listen = v["listen"] or (f"tcp:{v['port']}:interface=127.0.0.1",)
    tunnel_on = v["tunnel_enabled"] and not v["no_tunnel"]
    return GatewaySettings(
        mcp=v["mcp"],
        listen=listen,
        widgets=_widgets_source(v["widgets"], cli.get("widgets") is not None, source, loaded.path, cwd),
        csp_mode=v["csp_mode"],
        csp_domains=v["csp_domains"],
        csp_domain=v["csp_domain"],
        relay_url=v["relay_url"] if tunnel_on else None,
        tunnel_token=v["tunnel_token"],
        tunnel_subdomain=v["tunnel_subdomain"],
        tunnel_ping_interval=v["tunnel_ping_interval"],
        tunnel_ping_timeout=v["tunnel_ping_timeout"],
        events=v["events"],
        upstream_timeout=v["upstream_timeout"],
        max_request_body=v["max_request_body"],
        config_path=loaded.path,
        csp_widgets=_csp_widgets(loaded.document, source),
        warnings=loaded.warnings,
    )


# --- the relay (`twist mcpr-relay`)

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
    for where, entry in _array_of_tables(document, ("relay", "tokens"), source, ("token", "subdomains"),
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
        raise ConfigError(f"{source}: key 'mode': expected \"relay\" for `twist mcpr-relay`, got {_show(mode)}")
    if v["domain"] is None:
        raise ConfigError(f"no relay domain: pass --domain D (or set [relay] domain in {CONFIG_NAME})")
    try:
        domain = parse_domain(v["domain"])
    except ValueError as e:
        raise ConfigError(f"relay domain: {e}, got {_show(v['domain'])}") from None
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
                          f"got {_show(public_url)}")
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
