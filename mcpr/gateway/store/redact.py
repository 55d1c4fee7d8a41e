"""What the store must not keep: credentials in headers, queries and bodies, replaced before writing.

A debugging log that holds bearer tokens and session cookies is a liability on
disk, so values are replaced by `[redacted]` and the shape around them is kept
(the auth scheme, cookie names, the rest of the JSON), which is what someone
debugging needs to see.  One rule says which names are secret, for header
names, query and form parameters, and JSON object keys alike: the name,
lower-cased without `-`, `_`, `.` or spaces, ends with one of `SECRET_ENDINGS`
(`Authorization`, `X-Api-Key`, `access_token`, `client_secret`, `password`,
`Set-Cookie`, `code_verifier`...).  `max_tokens` and `tokens` do not match.

Bodies are redacted as bytes, without parsing, because a captured body is
often cut at the cap (or is an SSE stream of JSON events): every JSON string
value whose key is secret is replaced, at any depth, including one cut off by
the cap; JSON that is itself inside a JSON string is not looked into.
It runs as a request's rows are made (`Batch.add`), once per request, never per chunk.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Iterable, Sequence
from urllib.parse import unquote_plus

REDACTED = "[redacted]"
SECRET_ENDINGS = ("token", "secret", "password", "passwd", "passphrase", "apikey", "authorization", "cookie",
                  "credential", "credentials", "privatekey", "verifier")

_SEPARATORS = re.compile(r"[-_. ]")
# Cheap test first: most bodies hold no secret-looking name at all, and are then kept as they are.  It
# looks at the lower-cased bytes: with re.IGNORECASE the same search took 7 times as long, more than the
# rest of a small request's row together.
_HINT = re.compile(rb"token|secret|passw|passphrase|api.?key|authorization|cookie|credential|private.?key|verifier")
# A JSON key and its string value; the value may be cut off by the end of the capture.
_JSON_PAIR = re.compile(rb'"((?:[^"\\]|\\.){1,200})"(\s*:\s*)"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_FORM_PAIR = re.compile(rb"(^|&)([^=&]*)=([^&]*)")


@functools.lru_cache(maxsize=4096)  # the same few header names and JSON keys, request after request
def secret_name(name: str) -> bool:
    return _SEPARATORS.sub("", name.lower()).endswith(SECRET_ENDINGS)


def _hinted(data: bytes) -> bool:
    """Whether `data` may hold a secret-looking name (a false yes only costs the full look)."""
    return _HINT.search(data.lower()) is not None


def header_value(name: str, value: str) -> str:
    """`value` of header `name` as the store keeps it."""
    if name in ("authorization", "proxy-authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        return f"{scheme} {REDACTED}" if credentials else REDACTED
    if name == "cookie":
        return "; ".join(f"{part.partition('=')[0].strip()}={REDACTED}" for part in value.split(";") if part.strip())
    if name == "set-cookie":
        pair, _, attributes = value.partition(";")
        return f"{pair.partition('=')[0].strip()}={REDACTED}" + (f";{attributes}" if attributes else "")
    return REDACTED if secret_name(name) else value


_json_string = json.encoder.encode_basestring  # json.dumps(text, ensure_ascii=False), in C
_SPECIAL = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


@functools.lru_cache(maxsize=1024)
def _header_name(raw: bytes) -> tuple[str, str, bool]:
    """A header's name as kept, as JSON, and whether its values are to be looked at (redacted, or
    in part)."""
    name = raw.decode("latin-1").lower()
    return name, _json_string(name), name in _SPECIAL or secret_name(name)


@functools.lru_cache(maxsize=4096)
def _header_pair(raw_name: bytes, raw_value: bytes) -> str:
    """`[name, value]` as JSON text, for a header whose value is kept as it is.

    Cached: most headers (`Host`, `Accept`, `User-Agent`, `Content-Type`, `Server`...) come with the
    same value request after request, and encoding them each time was half of a request's rows.
    Secret ones are never cached (`headers_json`): their values are not kept past their request."""
    return f"[{_header_name(raw_name)[1]},{_json_string(raw_value.decode('latin-1'))}]"


def headers_json(raw: Iterable[tuple[bytes, Sequence[bytes]]]) -> tuple[str, str | None]:
    """`[[name, value], ...]` as JSON text, in order, names lower-cased, one pair per value, secrets
    redacted; and the content type, which says how to redact the body.

    Written out here rather than built as lists for `json.dumps`: this runs for every request,
    and the lists and the encoder's walk over them took as long as the rest of its row."""
    pairs = []
    content_type = None
    for name_bytes, values in raw:
        name, quoted, secret = _header_name(name_bytes)
        for v in values:
            if secret:
                pairs.append(f"[{quoted},{_json_string(header_value(name, v.decode('latin-1')))}]")
                continue
            if content_type is None and name == "content-type":
                content_type = v.decode("latin-1")
            pairs.append(_header_pair(name_bytes, v))
    return "[" + ",".join(pairs) + "]", content_type


def _json_pair(match: re.Match[bytes]) -> bytes:
    if not secret_name(match.group(1).decode("utf-8", "replace")):
        return match.group(0)
    return b'"' + match.group(1) + b'"' + match.group(2) + b'"' + REDACTED.encode() + b'"'


def _form_pair(match: re.Match[bytes]) -> bytes:
    if not secret_name(unquote_plus(match.group(2).decode("latin-1"))):
        return match.group(0)
    return match.group(1) + match.group(2) + b"=" + REDACTED.encode()


def form(data: bytes) -> bytes:
    """A query string or an `application/x-www-form-urlencoded` body."""
    return _FORM_PAIR.sub(_form_pair, data) if _hinted(data) else data


def body(data: bytes, content_type: str | None) -> bytes:
    """A captured body: form-encoded ones as forms, anything else as (possibly) JSON."""
    if not data or not _hinted(data):
        return data
    if content_type is not None and content_type.split(";", 1)[0].strip().lower() == \
            "application/x-www-form-urlencoded":
        return form(data)
    return _JSON_PAIR.sub(_json_pair, data)
