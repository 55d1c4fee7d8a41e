"""JSON-RPC 2.0 parsing and MCP method classification.

The proxy never rejects a body it cannot parse (the upstream decides); parsing
only tells routing whether a POST is MCP traffic and tells events what it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

REQUEST = "request"
NOTIFICATION = "notification"
RESPONSE = "response"
ERROR = "error"


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message, reduced to what routing, sessions and events need."""

    kind: str
    id: Any = None
    method: str | None = None
    params: Any = None
    result: Any = None
    error_code: int | None = None
    error_message: str | None = None

    @property
    def target(self) -> str | None:
        """The tool, resource URI or prompt a request is about, if its method has one."""
        params = self.params if isinstance(self.params, dict) else {}
        key = _TARGET_KEYS.get(self.method or "")
        value = params.get(key) if key else None
        return value if isinstance(value, str) else None


_TARGET_KEYS = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}

# Which event field the target of a method goes into.
TARGET_FIELD = {
    "tools/call": "tool",
    "prompts/get": "prompt",
    "resources/read": "resource",
    "resources/subscribe": "resource",
    "resources/unsubscribe": "resource",
}


@dataclass(frozen=True)
class Batch:
    """The messages of one body; `batch` tells an array from a single object."""

    messages: tuple[Message, ...]
    batch: bool = False

    @property
    def requests(self) -> tuple[Message, ...]:
        return tuple(m for m in self.messages if m.kind == REQUEST)

    @property
    def first(self) -> Message:
        return self.messages[0]

    def method_summary(self) -> str | None:
        methods = [m.method for m in self.messages if m.method]
        if not methods:
            return None
        return methods[0] if len(methods) == 1 else ",".join(methods)


def id_key(value: Any) -> Any:
    """A JSON-RPC id usable as a dict or set key (ids are scalars, but a broken peer may send anything)."""
    return value if isinstance(value, (str, int, float, type(None))) else repr(value)


def classify(obj: Any) -> Message | None:
    """A JSON value as a JSON-RPC 2.0 message, or None if it is not one."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return None
    method = obj.get("method")
    if isinstance(method, str):
        if "id" in obj:
            return Message(REQUEST, obj["id"], method, obj.get("params"))
        return Message(NOTIFICATION, None, method, obj.get("params"))
    if "error" in obj:
        error = obj["error"] if isinstance(obj["error"], dict) else {}
        code = error.get("code")
        message = error.get("message")
        return Message(
            ERROR,
            obj.get("id"),
            error_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            error_message=message if isinstance(message, str) else None,
        )
    if "result" in obj:
        return Message(RESPONSE, obj.get("id"), result=obj["result"])
    return None


def parse_value(obj: Any) -> Batch | None:
    if isinstance(obj, list):
        if not obj:
            return None
        messages = [classify(item) for item in obj]
        if any(m is None for m in messages):
            return None
        return Batch(tuple(messages), batch=True)  # type: ignore[arg-type]
    message = classify(obj)
    return None if message is None else Batch((message,))


def may_hold(body: bytes, *spellings: bytes) -> bool:
    """Whether JSON text may hold a name or string whose plain UTF-8 bytes are one of `spellings`:
    as written, or through a `\\u` escape, or in UTF-16 or UTF-32 (which `json.loads` also reads,
    and whose ASCII characters all come with NULs).  A body that cannot is not worth parsing for
    it.  Cheapest first: a one-byte search is memchr, so `\\u` is searched only where a
    backslash is."""
    return (b"\0" in body or any(spelling in body for spelling in spellings)
            or (b"\\" in body and b"\\u" in body))


def loads_or_none(text: bytes | str) -> Any:
    """The JSON value of `text`, or None if it is not JSON (or is too deeply nested to parse).

    A body that is `null` also gives None; no caller needs to tell it apart,
    since `null` is neither a JSON-RPC message nor anything to rewrite.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse(body: bytes) -> Batch | None:
    """The JSON-RPC messages of a body, or None if it is not JSON-RPC 2.0."""
    start = body[:1] if body[:1] not in b" \t\r\n" else body.lstrip()[:1]
    if start not in (b"{", b"["):
        return None
    return parse_value(loads_or_none(body))


def error_body(batch: Batch | None, code: int, message: str) -> bytes:
    """A JSON-RPC error answering every request of `batch` (id null if there is none)."""
    ids = [m.id for m in batch.requests] if batch else []
    errors = [
        {"jsonrpc": "2.0", "id": i, "error": {"code": code, "message": message}} for i in ids or [None]
    ]
    value: Any = errors if batch is not None and batch.batch and ids else errors[0]
    return json.dumps(value).encode()
