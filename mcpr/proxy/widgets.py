"""The widget source: a built folder served as static files, or a dev server proxied.

A widget's HTML and assets are fetched by the AI client's sandboxed iframe
from the same public URL as the MCP endpoint, so the gateway serves both:
asset requests go here, JSON-RPC goes upstream.  `resources/read` of
`ui://widget/<name>.html` is answered with the local HTML, so a rebuilt widget
shows without restarting the MCP server; the upstream's metadata is kept.

The folder is the only place on disk a request may reach: `..`, its encoded
forms, absolute paths and symlinks pointing out of the folder all get 404.
"""

from __future__ import annotations

import json
import mimetypes
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web import http
from twisted.web.client import readBody
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.proxy import jsonrpc
from mcpr.proxy.forward import Forwarder, UpstreamError

log = Logger()

_WIDGET_URI = re.compile(r"ui://widget/([A-Za-z0-9][A-Za-z0-9_.-]*)\.html")

# What a widget build contains, typed the way browsers require (module scripts
# are refused under a wrong type); the system's table fills in the rest.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8",
}

# HTML read into a `resources/read` answer; a widget larger than this is not a widget.
MAX_HTML = 8 << 20


def widget_name(uri: str | None) -> str | None:
    """`greeting` for `ui://widget/greeting.html`; None for any other URI."""
    match = _WIDGET_URI.fullmatch(uri) if isinstance(uri, str) else None
    return match.group(1) if match else None


def widget_uri(name: str) -> str:
    return f"ui://widget/{name}.html"


def substitute_html(result: Any, uri: str, html: str) -> bool:
    """Put the local HTML into a `resources/read` result's contents for `uri`; the metadata stays."""
    changed = False
    contents = result.get("contents") if isinstance(result, dict) else None
    for content in contents if isinstance(contents, list) else ():
        if isinstance(content, dict) and content.get("uri") == uri:
            content.pop("blob", None)
            if content.get("text") != html:
                content["text"] = html
                changed = True
    return changed


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _not_modified_since(request: Request, mtime: int) -> bool:
    """If-Modified-Since, which counts only when there is no If-None-Match (RFC 9110 §13.1.3)."""
    since = request.getHeader(b"if-modified-since")
    if since is None or request.getHeader(b"if-none-match") is not None:
        return False
    try:
        return http.stringToDatetime(since) >= mtime
    except (ValueError, IndexError):  # a malformed date is ignored, as RFC 9110 says
        return False


class WidgetFolder:
    """A built widget folder, served with correct types, validators and CORS."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.location = str(self.root)

    def find(self, path: bytes) -> Path | None:
        """The file a request path names inside the folder, or None."""
        try:
            decoded = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in decoded or "\\" in decoded:
            return None
        parts = [p for p in decoded.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        found = self._inside(self.root.joinpath(*parts))
        if found is not None and found.is_dir():
            found = self._inside(found / "index.html")
        return found if found is not None and found.is_file() else None

    def _inside(self, path: Path) -> Path | None:
        real = path.resolve()
        return real if real == self.root or self.root in real.parents else None

    def render(self, request: Request) -> bytes | int:
        """Serve the asset `request.path` names (GET or HEAD), or 404.

        Returns the whole body, or NOT_DONE_YET while a producer sends the
        file and finishes the request.
        """
        request.setHeader(b"access-control-allow-origin", b"*")  # module scripts load with CORS
        found = self.find(request.path)
        if found is None:
            request.setResponseCode(http.NOT_FOUND)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"404 not found\n"
        stat = found.stat()
        request.setHeader(b"cache-control", b"no-cache")  # rebuilt often: revalidate with the validators
        request.setHeader(b"last-modified", http.datetimeToString(int(stat.st_mtime)))
        if request.setETag(f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'.encode()) is http.CACHED:
            return b""
        if _not_modified_since(request, int(stat.st_mtime)):
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        request.setHeader(b"content-type", content_type(found).encode())
        request.setHeader(b"content-length", str(stat.st_size).encode())
        if request.method == b"HEAD":
            return b""
        file = found.open("rb")
        # Fails when the client left; a finished request fires it too, which `finished` checks first.
        left = request.notifyFinish()
        left.addErrback(lambda _: None)
        sent = FileSender().beginFileTransfer(file, request)

        def finished(_: object) -> None:
            file.close()
            if not request.finished and not left.called:
                request.finish()

        sent.addBoth(finished)
        return NOT_DONE_YET

    def names(self) -> list[str]:
        """Widgets in the folder: `<name>.html` at its top, or `<name>/index.html`."""
        found = set()
        for entry in self.root.iterdir():
            if entry.suffix == ".html" and entry.is_file():
                found.add(entry.stem)
            elif entry.is_dir() and (entry / "index.html").is_file():
                found.add(entry.name)
        return sorted(name for name in found if widget_name(widget_uri(name)) == name)

    def path_of(self, name: str) -> str | None:
        """The URL path serving widget `name`'s HTML, if the folder has it."""
        for path in (f"/{name}.html", f"/{name}/"):
            if self.find(path.encode()) is not None:
                return path
        return None

    async def html(self, name: str) -> str | None:
        path = self.path_of(name)
        found = self.find(path.encode()) if path is not None else None
        if found is None or found.stat().st_size > MAX_HTML:
            return None
        return found.read_bytes().decode("utf-8", "replace")


class WidgetDevServer:
    """A widget dev server (Vite and the like): assets and HTML are fetched from it."""

    kind = "dev-server"

    def __init__(self, url: str, forwarder: Forwarder) -> None:
        parts = urlsplit(url)
        self.location = url
        self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}".encode()
        self._forwarder = forwarder

    def url_for(self, uri: bytes) -> bytes:
        """The dev server's URL for a request's path and query."""
        return self._base + uri

    def path_of(self, name: str) -> str:
        """Where a dev server serves widget `name`: `/<name>.html`, as the Apps SDK examples do."""
        return f"/{name}.html"

    async def html(self, name: str) -> str | None:
        url = self.url_for(self.path_of(name).encode())
        try:
            response = await self._forwarder.send(b"GET", url, [(b"accept", b"text/html")], None)
        except UpstreamError as e:
            log.warn("widget {name}: dev server unavailable: {why}", name=name, why=e.reason)
            return None
        try:
            body = await readBody(response)
        except Exception as e:
            log.warn("widget {name}: dev server broke off its answer: {why}", name=name, why=str(e))
            return None
        if response.code != 200 or len(body) > MAX_HTML:
            log.warn("widget {name}: dev server answered {status} ({size} bytes) for {url}", name=name,
                     status=response.code, size=len(body), url=url.decode("latin-1"))
            return None
        return body.decode("utf-8", "replace")


WidgetSource = WidgetFolder | WidgetDevServer


def open_source(spec: str, forwarder: Forwarder) -> WidgetSource:
    """`--widgets`: an http(s) URL is a dev server, anything else a folder."""
    if spec.startswith(("http://", "https://")):
        return WidgetDevServer(spec, forwarder)
    return WidgetFolder(Path(spec))


async def local_html(batch: jsonrpc.Batch, source: WidgetSource) -> dict[Any, tuple[str, str]]:
    """(widget URI, local HTML) for each `resources/read` of a `ui://widget/<name>.html` in `batch`,
    by JSON-RPC id.

    Never fails: a widget that cannot be read leaves the upstream's HTML in place.
    """
    found: dict[Any, tuple[str, str]] = {}
    for message in batch.requests:
        uri = message.target if message.method == "resources/read" else None
        name = widget_name(uri)
        if uri is None or name is None:
            continue
        try:
            html = await source.html(name)
        except Exception:
            log.failure("reading widget {name} from {source} failed", name=name, source=source.location)
            continue
        if html is not None:
            found[jsonrpc.id_key(message.id)] = (uri, html)
    return found


def listing(source: WidgetSource) -> bytes:
    """`GET /widgets`: the widgets in the folder; a dev server cannot be listed (`null`).

    Not where they are: anyone with the tunnel's URL may ask, and the folder's absolute path (or
    the dev server's local address) is the developer's business."""
    widgets = None
    if isinstance(source, WidgetFolder):
        widgets = [{"name": name, "uri": widget_uri(name), "path": source.path_of(name)} for name in source.names()]
    body = {"source": source.kind, "widgets": widgets}
    return json.dumps(body, indent=2).encode() + b"\n"
