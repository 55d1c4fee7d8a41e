"""What both ends of a tunnel agree on: the subprotocol, close codes and flow-control sizes.

Registration is the original mcpr's JSON exchange (DESIGN §3); after it, with
the `mcpr-tunnel.h2` subprotocol, the socket's binary messages carry one
HTTP/2 connection, the relay being the client and the gateway the server.
"""

from __future__ import annotations

SUBPROTOCOL = "mcpr-tunnel.h2"
REGISTER_PATH = "/_tunnel/register"

# Close codes (DESIGN §3).
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
POLICY = 1008
INTERNAL_ERROR = 1011
AUTH_FAILED = 4001
EVICTED = 4002
IN_USE = 4003
INVALID_SUBDOMAIN = 4004
TOO_MANY = 4008
EVICTED_REASON = "evicted: another client registered with the same tunnel"

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
