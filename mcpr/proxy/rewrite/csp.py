"""Widget Content Security Policies, rewritten at the edge.

An MCP App declares, in `_meta`, the domains its widget's sandboxed iframe may
reach: OpenAI's shape is `openai/widgetCSP` {connect_domains, resource_domains,
frame_domains}, Claude's (MCP Apps) is `ui.csp` {connectDomains,
resourceDomains, frameDomains}.  A server written for localhost declares
localhost, which is useless once the server is reached through a public URL,
and omits that URL, which the widget needs to load its own assets.  The proxy
fixes the metadata on the way out, per environment, so the server need not
know where it is served from.

Only metadata objects change.  Tool schemas, descriptions and HTML text are
never read or touched, and a `_meta` whose CSP part is not the documented
shape is left exactly as it came: a guess would hide the server's bug.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator

from mcpr.proxy.jsonrpc import may_hold

EXTEND = "extend"
OVERRIDE = "override"

# Responses to these methods carry widget metadata.
REWRITTEN_METHODS = frozenset(
    {"tools/list", "tools/call", "resources/list", "resources/templates/list", "resources/read"}
)

OPENAI_CSP = "openai/widgetCSP"
OPENAI_DOMAIN = "openai/widgetDomain"
OPENAI_TEMPLATE = "openai/outputTemplate"
META_KEYS = ("_meta", "meta")  # `meta` is what some early servers wrote

# (directive, OpenAI key, Claude key)
DIRECTIVES = (
    ("connect", "connect_domains", "connectDomains"),
    ("resource", "resource_domains", "resourceDomains"),
    ("frame", "frame_domains", "frameDomains"),
)

WIDGET_MIME_TYPES = ("text/html+skybridge", "text/html;profile=mcp-app")

_MISSING = object()


@dataclass(frozen=True)
class WidgetRule:
    """A `[[csp.widget]]` entry: extra domains, and maybe another mode, for widgets whose URI matches."""

    match: str
    mode: str | None = None
    connect: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    frame: tuple[str, ...] = ()

    def matches(self, uri: str | None) -> bool:
        return uri is not None and fnmatchcase(uri, self.match)


@dataclass(frozen=True)
class CspPolicy:
    """The configured `[csp]` table: what to do with the domains upstream declares."""

    mode: str = EXTEND
    domains: tuple[str, ...] = ()
    domain: str | None = None  # the public origin, when set explicitly
    widgets: tuple[WidgetRule, ...] = ()

    def rule_for(self, uri: str | None) -> WidgetRule | None:
        """The first `[[csp.widget]]` entry matching `uri`, in file order."""
        return next((rule for rule in self.widgets if rule.matches(uri)), None)


def source_host(entry: str) -> str | None:
    """The host a CSP source names (`https://a.b:1/x` → `a.b`), None for `data:`, `'self'` and the like."""
    rest = entry.split("://", 1)[1] if "://" in entry else entry
    if rest.startswith("'") or (rest.endswith(":") and "/" not in rest):
        return None
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    if netloc.startswith("["):
        host = netloc[1:].partition("]")[0]
    else:
        host = netloc.partition(":")[0]
    return host.lower() or None


def is_local_host(host: str | None) -> bool:
    """localhost, *.localhost, loopback and unspecified addresses: names that mean "this machine"."""
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


# A rewriter is made for every widget-bearing answer, and its origin is one of very few (the tunnel's
# URL, `[csp].domain`): parsing it each time was 3 % of a tunnelled tools/call's CPU.
@functools.lru_cache(maxsize=64)
def _is_local_origin(origin: str) -> bool:
    return is_local_host(source_host(origin))


def _csp_shape(value: Any, keys: tuple[str, ...]) -> bool:
    """A CSP object whose directives, where present, are lists of strings (loops: this runs per tool)."""
    if not isinstance(value, dict):
        return False
    for key in keys:
        entries = value.get(key, _MISSING)
        if entries is _MISSING:
            continue
        if not isinstance(entries, list):
            return False
        for entry in entries:
            if not isinstance(entry, str):
                return False
    return True


_OPENAI_KEYS = tuple(d[1] for d in DIRECTIVES)
_CLAUDE_KEYS = tuple(d[2] for d in DIRECTIVES)


class CspRewriter:
    """Rewrites the widget metadata of one response, for one public origin.

    `origin` is the public origin the client reached us at (the tunnel URL or
    `[csp].domain`), or None in direct mode; a local tunnel URL counts as none.  Self-references (localhost and the
    upstream's host) are only dropped when there is an origin to put first:
    without one the client reached us on this machine, so they still work, and
    with no `[csp]` setting either there is nothing to do at all.  Rewriting a
    rewritten answer changes nothing, so a second proxy in line is harmless.
    """

    def __init__(self, policy: CspPolicy, origin: str | None, upstream_host: str) -> None:
        origin = origin.rstrip("/") if origin else None
        self.policy = policy
        # A local tunnel URL (a relay on this machine) is no public origin; `[csp] domain` is what
        # the user said, local or not (the demo sets it to its local tunnel's URL).
        local = origin is not None and _is_local_origin(origin)
        self.origin = origin if origin and (not local or origin == policy.domain) else None
        self._upstream_host = upstream_host.lower()
        # The same few entries and rules repeat across every tool of a list.
        self._self: dict[str, bool] = {}
        self._plans: dict[WidgetRule | None, tuple[str, dict[str, list[str]]]] = {}

    @property
    def active(self) -> bool:
        """Whether there is anything to do: without an origin or a `[csp]` setting, metadata passes as is."""
        policy = self.policy
        return self.origin is not None or bool(policy.domains or policy.widgets) or policy.mode == OVERRIDE

    def is_self(self, entry: str) -> bool:
        known = self._self.get(entry)
        if known is None:
            host = source_host(entry)
            known = self._self[entry] = host is not None and (is_local_host(host) or host == self._upstream_host)
        return known

    # -- results

    def rewrite_result(self, method: str, result: Any) -> bool:
        """Rewrite, in place, the metadata in the result of `method`; whether anything changed."""
        if not isinstance(result, dict) or not self.active:
            return False
        changed = self._rewrite_item(result, _meta_uri(result), widget=False)
        for item, uri, widget in _items(method, result):
            changed |= self._rewrite_item(item, uri, widget)
        return changed

    def _rewrite_item(self, item: dict, uri: str | None, widget: bool) -> bool:
        changed = False
        present = [key for key in META_KEYS if key in item]
        for key in present:
            meta = self.rewrite_meta(item[key], uri, widget)
            if meta is not None:
                item[key] = meta
                changed = True
        if not present and widget:
            meta = self.rewrite_meta({}, uri, widget)
            if meta is not None:
                item["_meta"] = meta
                changed = True
        return changed

    # -- one metadata object

    def rewrite_meta(self, meta: Any, uri: str | None, widget: bool = False) -> dict | None:
        """The rewritten copy of `meta`, or None to leave it as it is.

        A meta with neither CSP shape (nor `openai/widgetDomain`) is only given
        one when it belongs to a widget resource (`widget`), which needs the
        public origin to load its assets; any other meta is not about a widget.
        """
        if not isinstance(meta, dict):
            return None
        openai = meta.get(OPENAI_CSP, _MISSING)
        ui = meta.get("ui", _MISSING)
        claude = ui.get("csp", _MISSING) if isinstance(ui, dict) else _MISSING
        if (
            (openai is not _MISSING and not _csp_shape(openai, _OPENAI_KEYS))
            or (claude is not _MISSING and not _csp_shape(claude, _CLAUDE_KEYS))
            or (ui is not _MISSING and not isinstance(ui, dict))
        ):
            return None
        has_csp = openai is not _MISSING or claude is not _MISSING
        if not (has_csp or widget or OPENAI_DOMAIN in meta):
            return None
        # Past the shape check, each is a dict or missing.
        openai = openai if isinstance(openai, dict) else {}
        claude = claude if isinstance(claude, dict) else {}
        directives = self._directives(openai, claude, uri)
        out = dict(meta)
        if has_csp or directives:
            new_openai = dict(openai)
            new_claude = dict(claude)
            for name, openai_key, claude_key in DIRECTIVES:
                if name in directives:
                    new_openai[openai_key] = directives[name]
                    new_claude[claude_key] = list(directives[name])
            out[OPENAI_CSP] = new_openai
            out["ui"] = {**(ui if isinstance(ui, dict) else {}), "csp": new_claude}
        if self.origin is not None:
            out[OPENAI_DOMAIN] = self.origin
        return None if out == meta else out

    def _directives(self, openai: dict, claude: dict, uri: str | None) -> dict[str, list[str]]:
        """Each directive's domains: the origin, the configured ones, then the upstream's kept ones.

        Configured before kept: a configured self-reference would otherwise move
        on a second pass, and the rewrite must be idempotent.
        """
        rule = self.policy.rule_for(uri) if self.policy.widgets else None
        mode, heads = self._plan(rule)
        out: dict[str, list[str]] = {}
        for name, openai_key, claude_key in DIRECTIVES:
            head = heads[name]
            values = list(head)
            declared = (openai.get(openai_key), claude.get(claude_key))
            if mode != OVERRIDE:
                seen = set(head)
                for entries in declared:
                    for entry in entries or ():
                        if entry not in seen and (self.origin is None or not self.is_self(entry)):
                            seen.add(entry)
                            values.append(entry)
            if values or declared != (None, None):
                out[name] = values
        return out

    def _plan(self, rule: WidgetRule | None) -> tuple[str, dict[str, list[str]]]:
        """The mode, and what comes first in each directive, for widgets under `rule`."""
        plan = self._plans.get(rule)
        if plan is None:
            heads = {}
            for name, _, _ in DIRECTIVES:
                first = [self.origin] if self.origin is not None and name != "frame" else []
                configured = self.policy.domains if name != "frame" else ()
                heads[name] = list(dict.fromkeys([*first, *configured, *(getattr(rule, name) if rule else ())]))
            plan = self._plans[rule] = ((rule.mode if rule else None) or self.policy.mode, heads)
        return plan


def _meta_uri(item: dict) -> str | None:
    """The widget a tool (or a tool's result) renders with, from its metadata."""
    for key in META_KEYS:
        meta = item.get(key)
        if not isinstance(meta, dict):
            continue
        ui = meta.get("ui")
        for candidate in (meta.get(OPENAI_TEMPLATE), ui.get("resourceUri") if isinstance(ui, dict) else None,
                          meta.get("ui/resourceUri")):
            if isinstance(candidate, str):
                return candidate
    return None


def _is_widget_resource(item: dict, uri: str | None) -> bool:
    mime = item.get("mimeType")
    if isinstance(mime, str) and mime.replace(" ", "").lower().startswith(WIDGET_MIME_TYPES):
        return True
    return uri is not None and uri.startswith("ui://")


# The methods whose answers `could_change` can rule out from their bytes: a tool's or a result's
# metadata is only ever rewritten, never added, except on an embedded widget resource.
SCREENED_METHODS = frozenset({"tools/list", "tools/call"})


def could_change(body: bytes) -> bool:
    """Whether an answer to a `SCREENED_METHODS` request may hold what `rewrite_result` changes:
    a metadata member (`_meta` or `meta`, both ending in `meta"`) or an embedded resource
    (`"type": "resource"`).  Most `tools/call` answers hold neither: they pass unparsed."""
    return may_hold(body, b'meta"', b'"resource"')


def _items(method: str, result: dict) -> Iterator[tuple[dict, str | None, bool]]:
    """Each object of a result that may carry widget metadata: (object, widget URI, is a widget resource)."""
    if method == "tools/list":
        for tool in _dicts(result.get("tools")):
            yield tool, _meta_uri(tool), False
    elif method in ("resources/list", "resources/read", "resources/templates/list"):
        key = {"resources/list": "resources", "resources/read": "contents",
               "resources/templates/list": "resourceTemplates"}[method]
        for resource in _dicts(result.get(key)):
            uri = resource.get("uriTemplate" if key == "resourceTemplates" else "uri")
            uri = uri if isinstance(uri, str) else None
            yield resource, uri, _is_widget_resource(resource, uri)
    elif method == "tools/call":
        for content in _dicts(result.get("content")):
            embedded = content.get("resource") if content.get("type") == "resource" else None
            if isinstance(embedded, dict):
                uri = embedded.get("uri")
                uri = uri if isinstance(uri, str) else None
                yield embedded, uri, _is_widget_resource(embedded, uri)


def _dicts(value: Any) -> Iterator[dict]:
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield item
