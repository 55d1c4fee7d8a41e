"""The gateway's settings (`twist mcpr`): its table, `[[csp.widget]]` and the widget source."""

from __future__ import annotations

import hashlib
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
    parse_bool,
    parse_choice,
    parse_csp_source,
    parse_duration,
    parse_http_url,
    parse_list,
    parse_origin,
    parse_ping_seconds,
    parse_pool_size,
    parse_port,
    parse_seconds,
    parse_size,
    parse_text,
    show_value,
)
from mcpr.proxy.rewrite.csp import CspPolicy, WidgetRule

DEFAULT_PORT = 3000

# The event store's defaults (docs/limits.md): a week of traffic, at most this much disk, and the
# first 64 KiB of each body in each direction.
DEFAULT_RETAIN = 7 * 86400.0
DEFAULT_MAX_STORE = 256 << 20
DEFAULT_CAPTURE = 64 << 10


def parse_capture(value: Any) -> int:
    """Bytes of each body to keep, as `parse_size` reads them; 0 keeps none."""
    if (value == 0 and not isinstance(value, bool)) or (isinstance(value, str) and value.strip() in ("0", "off")):
        return 0
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError('expected a size in bytes such as "64KiB", or 0 to keep no bodies') from None


# The event store's rows, apart so that the query commands (`mcpr logs`, ...) find the store the
# same way the gateway does without needing the gateway's other settings.
STORE_SETTINGS: tuple[Setting, ...] = (
    Setting("store_enabled", parse_bool, True, ("store", "enabled")),
    Setting("no_store", parse_bool, False, ("no_store",), flag=True,
            help="Keep no event store (requests, sessions and tunnel events in SQLite)."),
    Setting("store_path", parse_text, None, ("store", "path"), env="MCPR_DB", option="db",
            help="The event store's SQLite file (env MCPR_DB; default: $STATE_DIRECTORY/store.sqlite3 "
                 "under systemd, else one per project under $XDG_STATE_HOME/mcpr/)."),
    Setting("store_retain", parse_duration, DEFAULT_RETAIN, ("store", "retain")),
    Setting("store_max_size", parse_size, DEFAULT_MAX_STORE, ("store", "max_size")),
    Setting("store_capture", parse_capture, DEFAULT_CAPTURE, ("store", "capture")),
)


# The inspector's page, like ngrok's: on this machine only, at a port people remember.
DEFAULT_INSPECTOR = "tcp:4040:interface=127.0.0.1"


def parse_inspector(value: Any) -> str | None:
    """An endpoint string for the inspector's listener, or `off` (None): no inspector."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false", "no", "none")):
        return None
    try:
        return parse_text(value)
    except ValueError:
        raise ValueError('expected an endpoint such as "tcp:4040:interface=127.0.0.1", or "off"') from None


RELAY_SCHEMES = ("http", "https", "ws", "wss")


def parse_relay_url(value: Any) -> str:
    """The relay's URL, with its scheme always written out.

    `http://` and `https://` (the relay's base URL), `ws://` and `wss://` (as the relay's status page
    and the original mcpr show it) are taken as they are.  A bare `host[:port]` means `wss://`, as
    for the original mcpr, except for an IP address or a local name (`localhost`, `*.localhost`),
    which means `ws://`: no public certificate names those, so such a relay speaks plain HTTP.
    """
    text = parse_text(value) if isinstance(value, str) else ""
    if text and "://" not in text:
        host = urlsplit("//" + text).hostname or ""
        try:
            ipaddress.ip_address(host)
            local = True
        except ValueError:
            local = host == "localhost" or host.endswith(".localhost")
        text = f"{'ws' if local else 'wss'}://{text}"
    parts = urlsplit(text)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in RELAY_SCHEMES or not parts.hostname or not port_ok or parts.query or parts.fragment \
            or any(c.isspace() for c in text):
        raise ValueError("expected the relay's URL: https://HOST, http://HOST:PORT, wss://HOST, ws://HOST:PORT "
                         "or HOST:PORT")
    return text

# The gateway's settings, each declared once: `twist mcpr`'s options, the keys of mcpr.toml, the
# environment variables and the defaults all come from here.
GATEWAY_SETTINGS: tuple[Setting, ...] = (
    Setting("mcp", parse_http_url, None, ("mcp",), help="URL of the MCP server, e.g. http://localhost:9000/mcp."),
    Setting("port", parse_port, DEFAULT_PORT, ("port",),
            help="Local port for direct HTTP mode (default 3000, on 127.0.0.1)."),
    Setting("listen", parse_list(parse_text), (), ("listen",), repeatable=True,
            help="Endpoint to serve direct HTTP on, e.g. tcp:3000:interface=0.0.0.0 (repeatable)."),
    Setting("widgets", parse_text, None, ("widgets",), help="Widget source: a dev server URL or a built folder."),
    Setting("csp_mode", parse_choice("extend", "override"), "extend", ("csp", "mode"),
            help="Widget CSP rewriting: extend (default) or override."),
    Setting("csp_domains", parse_list(parse_csp_source), (), ("csp", "domains"), option="csp", repeatable=True,
            help="Domain to add to widget CSPs (repeatable)."),
    Setting("csp_domain", parse_origin, None, ("csp", "domain")),
    Setting("relay_url", parse_relay_url, None, ("tunnel", "relay_url"), legacy=(("relay_url",),),
            env="MCPR_RELAY_URL", help="Relay to open a tunnel to: https://HOST, http://HOST:PORT, wss://, ws:// "
                                       "or HOST:PORT (wss, ws for an IP or localhost) (env MCPR_RELAY_URL)."),
    Setting("tunnel_enabled", parse_bool, True, ("tunnel", "enabled")),
    Setting("no_tunnel", parse_bool, False, ("no_tunnel",), flag=True,
            help="Do not open a tunnel even if a relay URL is configured."),
    Setting("tunnel_token", parse_text, None, ("tunnel", "token"), legacy=(("tunnel_token",),),
            env="MCPR_TUNNEL_TOKEN", secret=True),
    Setting("tunnel_subdomain", parse_text, None, ("tunnel", "subdomain"), legacy=(("tunnel_subdomain",),),
            env="MCPR_TUNNEL_SUBDOMAIN", option="subdomain",
            help="Subdomain to ask the relay for (env MCPR_TUNNEL_SUBDOMAIN)."),
    Setting("tunnel_ping_interval", parse_ping_seconds, 20.0, ("tunnel", "ping_interval")),
    Setting("tunnel_ping_timeout", parse_ping_seconds, 10.0, ("tunnel", "ping_timeout")),
    Setting("tunnel_pool", parse_pool_size, 64, ("tunnel", "pool"),
            help="Pooled sockets to open to the relay beside the tunnel at most, each carrying one request "
                 "at a time for less CPU than the tunnel's HTTP/2 streams; 4 at first, more when the relay "
                 "asks (default 64; 0 for none)."),
    Setting("events", parse_text, None, ("events",), help="Write JSON-lines events to FILE, or '-' for stdout."),
    Setting("upstream_timeout", parse_seconds, 30.0, ("upstream_timeout",),
            help="Seconds to wait for the upstream's response headers (30)."),
    Setting("max_request_body", parse_size, DEFAULT_MAX_BODY, ("max_request_body",),
            help="Largest request body accepted, e.g. 16MiB (default)."),
    *STORE_SETTINGS,
    Setting("inspector", parse_inspector, DEFAULT_INSPECTOR, ("inspector", "listen"), env="MCPR_INSPECTOR",
            help="Endpoint of the inspector page (the event store, live, with replay), or off (env MCPR_INSPECTOR; "
                 f"default {DEFAULT_INSPECTOR}, this machine only)."),
)


# Keys the gateway does not read but that may legitimately share its file.
SHARED_KEYS: tuple[tuple[str, ...], ...] = (("mode",), ("relay",), ("relay_domain",))
# Tables `load_gateway` reads itself, outside the settings table.
GATEWAY_TABLES: tuple[tuple[str, ...], ...] = (("csp", "widget"),)


@dataclass(frozen=True)
class StoreSettings:
    """Where the event store lives and what it keeps; `GatewaySettings.store` is None without one."""

    path: Path
    retain: float
    max_size: int
    capture: int
    # Where `path` came from, to start the errors of using it: "option --db",
    # "environment variable MCPR_DB", "<file>: key 'store.path'", or `DEFAULT_STORE_ORIGIN`.
    origin: str


@dataclass(frozen=True)
class GatewaySettings:
    """The table's values (less `port`, `tunnel_enabled` and `no_tunnel`, which only shape
    `listen` and `relay_url`) and what is read beside it."""

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
    tunnel_pool: int
    events: str | None
    upstream_timeout: float
    max_request_body: int
    store: StoreSettings | None
    inspector: str | None  # an endpoint string, None when off
    config_path: Path | None
    csp_widgets: tuple[WidgetRule, ...] = ()
    warnings: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)  # `Loaded.sources`

    @property
    def csp(self) -> CspPolicy:
        return CspPolicy(self.csp_mode, self.csp_domains, self.csp_domain, self.csp_widgets)


_WIDGET_DIRECTIVES = ("domains", "connect_domains", "resource_domains", "frame_domains")


def _csp_widgets(document: Mapping[str, Any], source: str) -> tuple[WidgetRule, ...]:
    """`[[csp.widget]]` entries: `match` (a glob on the widget URI), `mode`, and per-directive domains."""
    rules = []
    for where, entry in array_of_tables(document, ("csp", "widget"), source,
                                         ("match", "mode", *_WIDGET_DIRECTIVES), "match and domains"):
        values: dict[str, Any] = {}
        for key, parse in (("match", parse_text), ("mode", parse_choice("extend", "override")),
                           *((d, parse_list(parse_csp_source)) for d in _WIDGET_DIRECTIVES)):
            if key in entry:
                try:
                    values[key] = parse(entry[key])
                except ValueError as e:
                    raise ConfigError(f"{where}.{key}': {e}, got {show_value(entry[key])}") from None
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
            raise ConfigError(f"{where}: {e}, got {show_value(value)}") from None
    folder = ((config_path.parent if from_file and config_path else cwd) / value).resolve()
    if not folder.is_dir():
        raise ConfigError(f"{where}: expected a widget dev server URL or a folder, no such folder: {folder}")
    return str(folder)


def state_home(env: Mapping[str, str]) -> Path:
    """`$XDG_STATE_HOME`, else `~/.local/state` (the XDG base directory rule for an unset or relative value)."""
    value = env.get("XDG_STATE_HOME", "")
    return Path(value) if os.path.isabs(value) else Path(env.get("HOME") or Path.home()) / ".local" / "state"


def default_store_path(project: Path, env: Mapping[str, str]) -> Path:
    """The store of the gateway of `project` (the folder of its mcpr.toml, else where it was started).

    Under systemd, the unit's `StateDirectory=` (`$STATE_DIRECTORY`, the first if several): the
    one folder `mcpr@NAME` may write, one per instance.  Otherwise named by the folder, so that
    gateways of two projects keep two stores and the query commands, run from the same folder,
    find the same file: `<state>/mcpr/<folder name>-<8 hex digits of the folder's path>.sqlite3`.
    """
    systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd) / "store.sqlite3"
    folder = project.resolve()
    label = re.sub(r"[^A-Za-z0-9._-]", "_", folder.name)[:40] or "root"
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return state_home(env) / "mcpr" / f"{label}-{digest}.sqlite3"


DEFAULT_STORE_ORIGIN = "the default store path (one per project under $XDG_STATE_HOME/mcpr/)"
SYSTEMD_STORE_ORIGIN = "the default store path under systemd ($STATE_DIRECTORY/store.sqlite3)"


def _store(values: Mapping[str, Any], from_file: bool, config_path: Path | None, cwd: Path,
           env: Mapping[str, str], sources: Mapping[str, str]) -> StoreSettings | None:
    """The store's settings, its path made absolute (a path in the file is relative to the file)."""
    if values["no_store"] or not values["store_enabled"]:
        return None
    project = config_path.parent if config_path is not None else cwd
    if values["store_path"] is None:
        path = default_store_path(project, env)
        origin = SYSTEMD_STORE_ORIGIN if env.get("STATE_DIRECTORY") else DEFAULT_STORE_ORIGIN
    else:
        base = config_path.parent if from_file and config_path is not None else cwd
        path = (base / os.path.expanduser(values["store_path"])).resolve()
        origin = sources.get("store_path", "option --db")
    return StoreSettings(path, values["store_retain"], values["store_max_size"], values["store_capture"], origin)


def _path_from_file(cli: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    return cli.get("store_path") is None and not env.get("MCPR_DB")


def store_location(config: str | None = None, env: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> StoreSettings | None:
    """The store the gateway started in `cwd` (with `config`) uses, by the same rules: for the
    query commands, which read nothing else of the settings."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    loaded = load(STORE_SETTINGS, {}, config=config, env=env, cwd=cwd)
    return _store(loaded.values, _path_from_file({}, env), loaded.path, cwd, env, loaded.sources)


def load_gateway(
    cli: Mapping[str, Any],
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> GatewaySettings:
    cwd = Path.cwd() if cwd is None else cwd
    env = os.environ if env is None else env
    loaded = load(GATEWAY_SETTINGS, cli, config=config, env=env, cwd=cwd, known=SHARED_KEYS + GATEWAY_TABLES)
    v = dict(loaded.values)
    source = str(loaded.path) if loaded.path else CONFIG_NAME
    mode = loaded.document.get("mode")
    if mode == "relay":
        raise ConfigError(f"{source}: key 'mode': this file configures a relay; run `twist mcpr-relay`")
    if mode not in (None, "gateway"):
        raise ConfigError(f"{source}: key 'mode': expected \"gateway\" or \"relay\", got {show_value(mode)}")
    if v["mcp"] is None:
        raise ConfigError(f"no MCP server URL: pass --mcp URL or set 'mcp' in {CONFIG_NAME}")
    v["listen"] = listen_endpoints(v, cli, "tcp:{port}:interface=127.0.0.1")
    del v["port"]
    enabled, no_tunnel = v.pop("tunnel_enabled"), v.pop("no_tunnel")
    if no_tunnel or not enabled:
        v["relay_url"] = None
    v["store"] = _store(v, _path_from_file(cli, env), loaded.path, cwd, env, loaded.sources)
    for name in [s.name for s in STORE_SETTINGS]:
        del v[name]
    v["widgets"] = _widgets_source(v["widgets"], cli.get("widgets") is not None, source, loaded.path, cwd)
    return GatewaySettings(**v, config_path=loaded.path, csp_widgets=_csp_widgets(loaded.document, source),
                           warnings=loaded.warnings, sources=loaded.sources)
