"""MCP sessions as the proxy sees them, keyed by `Mcp-Session-Id`.

A client that never sends DELETE must not make the table grow for ever, so
idle sessions expire and the table has a hard cap (oldest activity goes first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

# A session without a request for this long is expired (the store's `sessions --active` agrees).
IDLE_TIMEOUT = 6 * 3600.0


@dataclass
class Session:
    id: str
    started: float
    last_activity: float
    client_name: str | None = None
    client_version: str | None = None
    server_name: str | None = None
    server_version: str | None = None
    protocol_version: str | None = None
    requests: int = 0
    state: str = "active"

    def as_event(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "state": self.state,
            "client_name": self.client_name,
            "client_version": self.client_version,
            "server_name": self.server_name,
            "server_version": self.server_version,
            "protocol_version": self.protocol_version,
            "requests": self.requests,
            "started": self.started,
            "last_activity": self.last_activity,
        }


def _info(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, dict):
        return None, None
    name, version = value.get("name"), value.get("version")
    return (name if isinstance(name, str) else None, version if isinstance(version, str) else None)


class SessionTracker:
    """Sessions in order of last activity; `on_change` hears every start, end and expiry."""

    def __init__(
        self,
        clock: IReactorTime,
        on_change: Callable[[Session], None] = lambda s: None,
        *,
        max_sessions: int = 10_000,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._on_change = on_change
        self._max = max_sessions
        self._idle = idle_timeout

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def started(self, session_id: str, params: Any, result: Any) -> Session:
        """Record an `initialize` exchange that the server answered with a session id."""
        now = self._clock.seconds()
        params = params if isinstance(params, dict) else {}
        result = result if isinstance(result, dict) else {}
        client_name, client_version = _info(params.get("clientInfo"))
        server_name, server_version = _info(result.get("serverInfo"))
        version = result.get("protocolVersion")
        session = Session(
            session_id,
            now,
            now,
            client_name,
            client_version,
            server_name,
            server_version,
            version if isinstance(version, str) else None,
            requests=1,
        )
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = session
        while len(self._sessions) > self._max:
            _, oldest = self._sessions.popitem(last=False)
            self._finish(oldest, "expired")
        self._on_change(session)
        return session

    def touch(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.requests += 1
            session.last_activity = self._clock.seconds()
            self._sessions.move_to_end(session_id)
        return session

    def ended(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._finish(session, "ended")
        return session

    def expire(self) -> None:
        cutoff = self._clock.seconds() - self._idle
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_activity > cutoff:
                break
            self._sessions.popitem(last=False)
            self._finish(oldest, "expired")

    def _finish(self, session: Session, state: str) -> None:
        session.state = state
        self._on_change(session)
