"""What one gateway's socket may cost the relay, whatever the gateway does (issue 10: S5, D3).

A gateway is a peer the relay does not control: it may flood control frames
that each cost CPU and an answer (HTTP/2 PING and SETTINGS are acknowledged,
WebSocket pings are ponged), or stop reading so that everything the relay
writes piles up in its memory.  The model is nghttp2's answer to
CVE-2019-9512/-9515 and CVE-2023-44487: a per-second budget of frames that
carry no response data, and a bounded queue of bytes towards a peer that does
not read.  Both tunnel protocols and the registration socket share the two
objects here, one of each per socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer


@dataclass(frozen=True)
class TunnelLimits:
    """The relay's settings that bound one gateway socket (`control_frame_rate`, `gateway_backlog`)."""

    control_rate: int = 1000
    """Control frames (or legacy messages without data, or WebSocket pings) per second, with a
    burst of as many; above it the socket is closed."""
    backlog: int = 1 << 20
    """Bytes the relay may write to a socket whose buffer is already full; above it the socket is
    closed.  Request bodies and new streams never count: they wait until the socket drains."""
    pool: int = 64
    """Pooled sockets its gateway may open (`tunnel_pool`; 0: none)."""


class ControlBudget:
    """A token bucket: `rate` tokens a second, at most `rate` saved up.

    `spend` is called once per message with the number of control frames it
    holds, so the cost is one clock read per message, not per frame.
    """

    def __init__(self, rate: int, clock: IReactorTime) -> None:
        self._rate = float(rate)
        self._tokens = float(rate)
        self._clock = clock
        self._last = clock.seconds()

    def spend(self, count: int = 1) -> bool:
        """Take `count` tokens; False once the budget is overdrawn (the peer is flooding)."""
        now = self._clock.seconds()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate) - count
        self._last = now
        return self._tokens >= 0


@implementer(IPushProducer)
class Outbound:
    """The write side of a gateway socket, registered as its transport's producer.

    Twisted pauses a transport's producer when the write buffer passes its
    `bufferSize` (64 KiB) and resumes it once the buffer is empty, so this is
    how the relay learns that a gateway is not reading: request bodies and new
    streams then wait (`full`), `drained` resumes them, and what must still be
    written meanwhile (acknowledgements, resets, pongs) is counted against
    `limit`: past it the gateway is closed rather than buffered without end.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.full = False
        self.backlog = 0
        self.drained: Callable[[], None] | None = None
        """Called when a full buffer has been written out; the tunnel sets it."""

    def wrote(self, size: int) -> bool:
        """Count a write; False once a full socket has been given more than `limit` bytes."""
        if not self.full:
            return True
        self.backlog += size
        return self.backlog <= self.limit

    # IPushProducer, driven by the socket's transport
    def pauseProducing(self) -> None:
        self.full = True

    def resumeProducing(self) -> None:
        self.full = False
        self.backlog = 0
        if self.drained is not None:
            self.drained()

    def stopProducing(self) -> None:
        self.drained = None
