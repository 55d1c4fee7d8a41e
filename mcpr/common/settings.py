"""The settings engine: `mcpr.toml`, the environment and the command line, merged.

One table of `Setting`s per program declares each setting once: its parser and
default, its TOML key, its environment variable and its command-line option
with the help text.  The program's `usage.Options` is generated from the same
table (`options_from`, `cli_values`), and one merge function applies the
priority CLI > environment > file > default, so the two programs cannot drift
apart in how they treat their inputs, and a new setting is one line.  Every
error names the key and where the bad value came from, because a user reading
"invalid port" cannot tell which of three places to fix.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from twisted.python import usage

from mcpr.common.protocol import MAX_POOL

CONFIG_NAME = "mcpr.toml"

# Both daemons cap request bodies at this size unless told otherwise.
DEFAULT_MAX_BODY = 16 << 20


class ConfigError(Exception):
    """A setting is missing, malformed, contradictory or unusable (an endpoint that cannot be
    bound, a file that cannot be written); the message says which and where."""


def show_value(value: Any) -> str:
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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """Seconds, as a number or a string such as "500ms", "30m", "7d" (a bare number is seconds).

    For spans a person thinks of in their own unit: retention, `--since`,
    a slowness threshold; `parse_seconds` stays the parser of timeouts.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) == 0:
        raise ValueError('expected a positive duration, e.g. "500ms", "30m" or "7d"')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


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


def parse_pool_size(value: Any) -> int:
    """Pooled sockets per tunnel (docs/protocol.md, "Pooled sockets"): 0 turns them off."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POOL:
        raise ValueError(f"expected a number of sockets from 0 (none) to {MAX_POOL}")
    return value


def parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def parse_http_url(value: Any) -> str:
    text = parse_text(value) if isinstance(value, str) else ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
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
        raise ValueError("expected an origin such as https://app.example.com") from None
    if parts.scheme not in ("http", "https") or not parts.hostname \
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
            raise ValueError("expected one of " + ", ".join(show_value(c) for c in choices))
        return value

    return parse


# --- the merge


@dataclass(frozen=True)
class Setting:
    """One setting, declared once: its name in the settings mapping and everything about where it
    may come from.

    A setting with `help` is also a command-line option, spelt `option` or else its name with
    dashes; one without is read from the environment and the file only.  A `flag` takes no
    value; a `repeatable` option collects every occurrence into a list.  `aliases` are other
    spellings of the option, each with its own help line.  The value of a `secret` setting is
    never repeated in an error, since errors end up in logs.
    """

    name: str
    parse: Callable[[Any], Any]
    default: Any = None
    path: tuple[str, ...] | None = None
    _: KW_ONLY
    legacy: tuple[tuple[str, ...], ...] = ()
    env: str | None = None
    help: str | None = None
    option: str | None = None
    flag: bool = False
    repeatable: bool = False
    aliases: tuple[tuple[str, str], ...] = ()
    secret: bool = False

    def __post_init__(self) -> None:
        if self.help is None and (self.option or self.flag or self.repeatable or self.aliases):
            raise ValueError(f"setting {self.name}: command-line details without help text")
        if self.flag and (self.repeatable or self.aliases):
            raise ValueError(f"setting {self.name}: a flag takes no value, so it cannot repeat or have aliases")

    @property
    def spelling(self) -> str:
        """The option's long name, which errors use too."""
        return self.option or self.name.replace("_", "-")


@dataclass(frozen=True)
class Loaded:
    values: dict[str, Any]
    path: Path | None
    document: dict[str, Any]
    warnings: tuple[str, ...]
    # Where each value that is not the default came from ("option --listen", "FILE: key 'port'"),
    # for errors found only when a value is used.
    sources: dict[str, str]

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


def exposed_secrets(path: Path | None, document: Mapping[str, Any], keys: Iterable[tuple[str, ...]]) -> str | None:
    """A one-line warning if the config file holds one of the secret `keys` and users other than
    the daemon's can read it; None if not (and off POSIX, where modes mean nothing).

    Group read access is fine when it is how the daemon itself reads the file: owned by someone
    else (root) and shared with the daemon's group, as the Debian package installs relay.toml
    (root:mcpr 0640), where `chmod 600` would lock the daemon out.
    """
    held = [".".join(key) for key in keys if _lookup(document, key) is not None]
    if path is None or not held or os.name != "posix":
        return None
    try:
        status = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(status.st_mode)
    through_group = status.st_uid != os.geteuid() and (status.st_gid == os.getegid()
                                                       or status.st_gid in os.getgroups())
    group = bool(mode & 0o040) and not through_group
    others = bool(mode & 0o004)
    if not (group or others):
        return None
    who = "group and others" if group and others else "others" if others else "its group"
    fix = "640" if through_group else "600"
    return (f"{path} holds secrets ({', '.join(dict.fromkeys(held))}) and is readable by {who} "
            f"(mode {mode:04o}): chmod {fix} {path}")


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
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Apply CLI > environment > file > default to every setting, validating each winner; where
    each winner came from goes into `sources`."""
    values: dict[str, Any] = {}
    for s in settings:
        raw, where = cli.get(s.name), f"option --{s.spelling}"
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
        if sources is not None:
            sources[s.name] = where
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            got = "" if s.secret else f", got {show_value(raw)}"
            raise ConfigError(f"{where}: {e}{got}") from None
    return values


def load(
    settings: Sequence[Setting],
    cli: Mapping[str, Any],
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    known: Iterable[tuple[str, ...]] = (),
    secrets: Iterable[tuple[str, ...]] = (),
) -> Loaded:
    """Read and merge; `secrets` are keys read outside the table (such as `[[relay.tokens]]`) that
    hold secrets, like the table's `secret` settings: the file is checked for who may read it."""
    env = os.environ if env is None else env
    path = find_config(config, Path.cwd() if cwd is None else cwd)
    document = read_config(path)
    source = str(path) if path else CONFIG_NAME
    sources: dict[str, str] = {}
    values = merge(settings, cli, env, document, source, sources)
    paths = [p for s in settings for p in ((s.path,) if s.path else ()) + s.legacy]
    warnings = [
        f"{source}: unknown key '{key}' (ignored)"
        for key in unknown_keys(document, [*paths, *known])
    ]
    secret_paths = [p for s in settings if s.secret for p in ((s.path,) if s.path else ()) + s.legacy]
    exposed = exposed_secrets(path, document, [*secret_paths, *secrets])
    if exposed is not None:
        warnings.append(exposed)
    return Loaded(values, path, document, tuple(warnings), sources)


def array_of_tables(document: Mapping[str, Any], path: tuple[str, ...], source: str, keys: Iterable[str],
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


def listen_endpoints(values: Mapping[str, Any], cli: Mapping[str, Any], port_endpoint: str) -> tuple[str, ...]:
    """The `listen` endpoints, else the one that `port` is a shorthand for (`port_endpoint`
    formatted with the port).

    `--port` and `--listen` both on the command line are refused: one of them would be ignored.
    """
    if cli.get("port") is not None and cli.get("listen"):
        example = port_endpoint.format(port=cli["port"])
        raise ConfigError(f"--port and --listen both given (--port {cli['port']}, --listen "
                          f"{' '.join(cli['listen'])}): give only --listen (--port {cli['port']} is short for "
                          f"--listen {example})")
    return values["listen"] or (port_endpoint.format(port=values["port"]),)


def listen_origin(sources: Mapping[str, str]) -> str:
    """Where the `listen` endpoints came from (`sources` of `Loaded`), for the errors of using them."""
    return sources.get("listen") or sources.get("port") or "--port (the default)"


# --- the command line: `usage.Options` generated from the same table


_Options = TypeVar("_Options", bound=usage.Options)


def _store(option: str, doc: str) -> Callable[[usage.Options, str], None]:
    def handler(self: usage.Options, value: str) -> None:
        self[option] = value

    handler.__doc__ = doc
    return handler


def _append(option: str, doc: str) -> Callable[[usage.Options, str], None]:
    def handler(self: usage.Options, value: str) -> None:
        self.setdefault(option, []).append(value)

    handler.__doc__ = doc
    return handler


def options_from(table: Sequence[Setting]) -> Callable[[type[_Options]], type[_Options]]:
    """A class decorator adding every command-line option of `table` to a `usage.Options`.

    Parameters and flags join the class's own `optParameters`/`optFlags` (with no default: a
    default there would hide the environment and the file); repeatable options and aliases
    become `opt_*` handlers, whose docstrings are their help lines.
    """

    def build(cls: type[_Options]) -> type[_Options]:
        parameters = list(cls.__dict__.get("optParameters", []))
        flags = list(cls.__dict__.get("optFlags", []))
        for s in table:
            if s.help is None:
                continue
            if s.flag:
                flags.append([s.spelling, None, s.help])
            elif s.repeatable:
                setattr(cls, "opt_" + s.spelling.replace("-", "_"), _append(s.spelling, s.help))
            else:
                parameters.append([s.spelling, None, None, s.help])
            for alias, doc in s.aliases:
                handler = (_append if s.repeatable else _store)(s.spelling, doc)
                setattr(cls, "opt_" + alias.replace("-", "_"), handler)
        # usage.Options reads these by name from each class of the MRO; its stubs do not declare them.
        setattr(cls, "optParameters", parameters)
        setattr(cls, "optFlags", flags)
        return cls

    return build


def cli_values(table: Sequence[Setting], options: Mapping[str, Any]) -> dict[str, Any]:
    """The command line parsed by an `options_from` class, as `merge` reads it: an option not
    given is None, so the environment, the file and the default still apply."""
    cli: dict[str, Any] = {}
    for s in table:
        if s.help is None:
            continue
        given = options.get(s.spelling)
        if s.flag:
            cli[s.name] = True if given else None
        elif s.repeatable:
            cli[s.name] = list(given) if given else None
        else:
            cli[s.name] = given
    return cli
