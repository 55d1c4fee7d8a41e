"""What both ends of a tunnel agree on: paths, subprotocol, close codes, flow-control sizes.

The wire protocol is specified in `docs/protocol.md`; this module is its
vocabulary, so the relay and the gateway cannot disagree on a code or a size.
"""

from __future__ import annotations

import enum

SUBPROTOCOL = "mcpr-tunnel.h2"
REGISTER_PATH = "/_tunnel/register"

# Pooled sockets (docs/protocol.md, "Pooled sockets"): plain HTTP/1.1 connections a gateway opens
# beside its registration, upgraded at POOL_PATH with the key its registration answer named.
POOL_PATH = "/_tunnel/pool"
POOL_UPGRADE = b"mcpr-pool"
POOL_HEADER = b"x-mcpr-pool"
# The most pooled sockets one tunnel may ask for; the relay's `tunnel_pool` setting lowers it.
MAX_POOL = 64

# WebSocket close reasons are capped at 123 bytes of UTF-8 (RFC 6455 §5.5); keep a margin.
MAX_REASON = 120


class CloseCode(enum.IntEnum):
    """Every close code a tunnel socket may end with (docs/protocol.md, "Close codes").

    `final` says whether a gateway should stop retrying (the user must change
    something first); `label` names the code in metrics.  4003 and 4008 are
    not final: a name taken or reserved by another token may come free, and a
    cap may have room again later, so the gateway retries with backoff.
    """

    final: bool
    label: str

    def __new__(cls, code: int, label: str, final: bool = False) -> "CloseCode":
        member = int.__new__(cls, code)
        member._value_ = code
        member.label = label
        member.final = final
        return member

    NORMAL = (1000, "normal")
    GOING_AWAY = (1001, "going_away")
    PROTOCOL_ERROR = (1002, "protocol_error")
    POLICY = (1008, "policy")
    INTERNAL_ERROR = (1011, "internal_error")
    TRY_AGAIN_LATER = (1013, "try_again_later")
    AUTH_FAILED = (4001, "auth_failed", True)
    EVICTED = (4002, "evicted", True)
    IN_USE = (4003, "in_use")
    INVALID_SUBDOMAIN = (4004, "invalid_subdomain", True)
    TOO_MANY = (4008, "too_many")


_LABELS = {int(code): code.label for code in CloseCode}


def label_of(code: int | None) -> str:
    """The metric label of a close code, known or not."""
    return _LABELS.get(code, "other") if code is not None else "other"


def fit_reason(reason: str) -> str:
    """`reason` cut to `MAX_REASON` bytes of UTF-8 without splitting a character."""
    return reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")


class Refused(Exception):
    """A socket is closed with `code` and `reason` (cut to fit a close frame).

    The relay raises it wherever a registration is refused (auth, names, the
    registry) and catches it in one place, which sends the close frame.
    """

    def __init__(self, code: CloseCode, reason: str) -> None:
        self.code = code
        self.reason = fit_reason(reason)
        super().__init__(self.reason)


# 4001's reason when the relay's auth provider could not be asked: the token may be fine, so a
# gateway retries instead of stopping (the original mcpr sends the same code and reason).
PROVIDER_UNAVAILABLE = "auth provider unavailable"

EVICTED_REASON = "evicted: another client registered with the same tunnel"

# 1013's reason when a cluster node cannot reach the cluster's registry (Redis): it keeps serving
# the tunnels it holds but cannot tell whether a name is free elsewhere, so it takes no new ones.
REGISTRY_UNAVAILABLE = "cluster registry unavailable, retry later"

# The relay grants each stream this much unacknowledged response data, and
# the whole tunnel at most CONNECTION_WINDOW: a slow public reader stalls its
# own stream after STREAM_WINDOW bytes, and a tunnel never buffers more than
# CONNECTION_WINDOW in the relay.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 8 << 20
MAX_FRAME = 1 << 16

# Concurrent streams a gateway accepts on its tunnel.
MAX_STREAMS = 1024

# One WebSocket message carries at most this much of the HTTP/2 byte stream.
MAX_MESSAGE = 1 << 20


def split(data: bytes, size: int = MAX_MESSAGE) -> list[bytes]:
    """HTTP/2 is a byte stream, so it may be cut anywhere to bound message sizes."""
    if len(data) <= size:
        return [data]
    return [data[i:i + size] for i in range(0, len(data), size)]
