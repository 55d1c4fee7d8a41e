"""Who may register which subdomain on the relay.

Three modes, by priority (docs/protocol.md, "Authentication"): static
tokens from the command line or the configuration file, else an HTTP auth
provider with the original mcpr's contract, else open mode where any token
may take any free label.

Registration is two steps, so the relay can run the slow one (the provider
round trip) before it looks at names:

- `Authenticator.authenticate(token, subdomain)` turns a token into a `Grant`
  (the owner identity plus the patterns it may use), or raises `AuthFailed`;
- `authorize(grant, requested, token)` turns a grant and the requested name
  into the subdomain to register, or the patterns to offer the client.

Refusals carry the WebSocket close code and reason the relay sends, with the
same `Refused` the registry raises.  Tokens are never
logged nor put in a reason: logs name a token by `token_hint`.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Iterable

from hyperlink import DecodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from mcpr.common.failures import cancelled, describe
from mcpr.common.names import is_concrete, matches, parse_pattern, valid_label
from mcpr.common.protocol import PROVIDER_UNAVAILABLE, CloseCode, Refused
from mcpr.relay.identity import open_subdomain, owner_id, token_hint

log = Logger()

INVALID_TOKEN = "invalid token"

# The shape of `open_subdomain`: open mode grants such a name only to the token it comes from.
_DERIVED = re.compile(r"[0-9a-f]{12}")

# An answer to /api/verify is a few hundred bytes; more is a broken provider,
# and reading it whole would let one make the relay buffer without bound.
MAX_PROVIDER_BODY = 64 * 1024


class AuthFailed(Refused):
    """The token may not register (this name): close with 4001 and `reason`.

    The reason may come from the auth provider, so it is cut to fit a
    WebSocket close frame.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(CloseCode.AUTH_FAILED, reason)


@dataclass(frozen=True)
class StaticToken:
    """A token given to the relay itself, and the subdomain patterns it may use.

    The token is left out of the repr, so logging a `StaticToken` (or an
    exception that holds one) cannot leak it.
    """

    token: str = field(repr=False)
    patterns: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token:
            raise ValueError("expected a non-empty static token")
        if not self.patterns:
            raise ValueError("expected at least one subdomain pattern for a static token")
        for pattern in self.patterns:
            parse_pattern(pattern)


def parse_static_token(spec: str) -> StaticToken:
    """The command line's `TOKEN:PATTERN[,PATTERN]`; errors never repeat the token.

    The token is everything before the last `:` (patterns hold no `:`, tokens
    may), and blanks around patterns are ignored, as in the configuration file.
    """
    token, colon, patterns = spec.rpartition(":")
    names = tuple(p.strip() for p in patterns.split(",") if p.strip())
    if not colon or not token or not names:
        raise ValueError("expected TOKEN:PATTERN[,PATTERN]")
    return StaticToken(token, names)


@dataclass(frozen=True)
class Grant:
    """What an authenticated token may do.

    `owner` is the token's `owner_id` (the registry owner); `patterns` is
    `None` in open mode, where any valid label is allowed; `source` is
    `"static"`, `"provider"` or `"open"`, for logs and metrics.
    """

    owner: str
    patterns: tuple[str, ...] | None
    source: str


@dataclass(frozen=True)
class _Entry:
    """A static token as the authenticator keeps it: its owner id (a digest), never the token."""

    owner: str
    patterns: tuple[str, ...]


class Authenticator:
    """Checks tokens against static tokens, else an auth provider, else lets any in.

    It owns an HTTP client over its own persistent pool (treq's global pool
    would outlive the service and dirty test reactors); `close` drops the
    pool's idle connections.  A `client` passed in stays the caller's.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        static: Iterable[StaticToken] = (),
        provider: str | None = None,
        secret: str | None = None,
        *,
        timeout: float = 5.0,
        client: HTTPClient | None = None,
    ) -> None:
        self._reactor = reactor
        self._static: tuple[_Entry, ...] = ()
        self.reload_static(static)
        self._verify_url = _verify_url(provider) if provider is not None else None
        self._secret = secret
        self._timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            # A jar that takes no cookies: a provider's session cookie set while
            # verifying one token must not be replayed when verifying the next.
            jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
            client = HTTPClient(Agent(reactor, pool=self._pool), cookiejar=jar)
        self._client = client

    def reload_static(self, tokens: Iterable[StaticToken]) -> None:
        """Replace the static tokens (SIGHUP).  Emptying them switches to the
        provider or open mode, by the same priority as at start."""
        self._static = tuple(_Entry(owner_id(t.token), t.patterns) for t in tokens)

    def static_owners(self) -> set[str]:
        """The owners of the current static tokens: the relay closes tunnels of any other
        owner after a reload in static mode, since their token was revoked."""
        return {entry.owner for entry in self._static}

    def close(self) -> Deferred[None]:
        """Close the idle connections of our own pool (service stop, test cleanup)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    async def authenticate(self, token: str, subdomain: str | None = None) -> Grant:
        """The `Grant` for `token`, or raise `AuthFailed`.

        `subdomain` (the client's requested name, if any) is only passed to
        the provider, which may use it in its decision; `authorize` checks it.
        Every mode needs a token: even open mode names a tunnel's owner by it,
        which decides who may take a name over.  Cancelling the call (the
        client left) drops the provider request and raises `CancelledError`,
        without the warning an outage gets.
        """
        if not isinstance(token, str) or not token:
            raise AuthFailed(INVALID_TOKEN)
        if self._static:
            return self._check_static(token)
        if self._verify_url is not None:
            return await self._ask_provider(self._verify_url, token, subdomain)
        return Grant(owner_id(token), None, "open")

    def _check_static(self, token: str) -> Grant:
        # Compare fixed-size digests, so the time does not depend on token
        # lengths, and compare with every entry, so it does not tell which one
        # matched.  A token listed twice gets the patterns of both entries.
        owner = owner_id(token)
        patterns: dict[str, None] = {}
        for entry in self._static:
            if hmac.compare_digest(owner, entry.owner):
                patterns.update(dict.fromkeys(entry.patterns))
        if not patterns:
            raise AuthFailed(INVALID_TOKEN)
        return Grant(owner, tuple(patterns), "static")

    async def _ask_provider(self, url: str, token: str, subdomain: str | None) -> Grant:
        hint = token_hint(token)
        exchange = Deferred.fromCoroutine(
            self._exchange(url, token, subdomain if valid_label(subdomain) else None))
        # One deadline for connecting, the headers and the body: treq's own
        # timeout stops at the headers, and a provider that stalls mid-body
        # must not hold a registration open.  Cancelling surfaces as whatever
        # the step in progress makes of it (e.g. ResponseNeverReceived), so
        # whether the deadline passed is read from the timer, not the error.
        deadline = self._reactor.callLater(self._timeout, exchange.cancel)
        try:
            status, body = await exchange
        except Exception as e:
            if deadline.active():
                if cancelled(e):
                    # Our caller gave up (the client left): not the provider's fault.
                    raise CancelledError() from None
                raise self._unavailable(hint, describe(e)) from None
            raise self._unavailable(hint, f"no answer within {self._timeout} s") from None
        finally:
            if deadline.active():
                deadline.cancel()
        if status == 200:
            patterns = _provider_patterns(body)
            if patterns is None:
                raise self._unavailable(hint, "200 without a list of subdomain patterns")
            return Grant(owner_id(token), self._keep_valid(patterns, hint), "provider")
        if status in (401, 403):
            raise AuthFailed(_provider_error(body) or INVALID_TOKEN)
        raise self._unavailable(hint, f"HTTP {status}")

    async def _exchange(self, url: str, token: str, subdomain: str | None) -> tuple[int, bytes]:
        headers: dict[bytes | str, bytes | str] = {"X-Relay-Secret": self._secret} if self._secret else {}
        # No redirects: following one would send the relay secret wherever
        # the provider (or someone in its path) points.
        response = await self._client.post(
            url, json={"token": token, "subdomain": subdomain},
            headers=headers, allow_redirects=False)
        return response.code, await _read_capped(response, MAX_PROVIDER_BODY)

    def _keep_valid(self, patterns: list[str], hint: str) -> tuple[str, ...]:
        kept = []
        for pattern in patterns:
            try:
                kept.append(parse_pattern(pattern))
            except ValueError as e:
                log.warn("auth provider sent an unusable pattern for token {token_hint}, "
                         "ignored: {why}", token_hint=hint, why=str(e))
        return tuple(kept)

    def _unavailable(self, hint: str, why: str) -> AuthFailed:
        log.warn("auth provider unavailable for token {token_hint}: {why}", token_hint=hint, why=why)
        return AuthFailed(PROVIDER_UNAVAILABLE)


def authorize(grant: Grant, requested: str | None, token: str) -> str | list[str]:
    """The subdomain `grant` registers, or the patterns to offer its client.

    - A grant of exactly one pattern without `*` registers that name, whatever was asked for (the
      original relay's rule: its clients need not answer an offer, nor know their name).
    - Otherwise a requested name must be a valid label (else `Refused` 4004)
      and match one of the grant's patterns (else `AuthFailed` 4001); in open
      mode any valid label is allowed, except one shaped like a token-derived
      name (12 hex digits) of another token: those URLs are public, and
      their owners must get them even before they first connect (4001, as
      retrying never helps).  It is returned as is.
    - Without one, open mode gives `open_subdomain(token)`; otherwise the
      grant's patterns are returned as a list, for the relay to send as
      `{"subdomains": [...]}`.  The client's pick comes back through
      `authorize` again, as a requested name.  A grant with no patterns (a
      provider that answered `[]`) can register nothing: `AuthFailed`.
    """
    if grant.patterns is not None and len(grant.patterns) == 1 and is_concrete(grant.patterns[0]):
        return grant.patterns[0]
    if requested is not None:
        if not valid_label(requested):
            raise Refused(CloseCode.INVALID_SUBDOMAIN, "invalid subdomain")
        if grant.patterns is None:
            if _DERIVED.fullmatch(requested) and requested != open_subdomain(token):
                raise AuthFailed(f"subdomain '{requested}' is reserved for the token it is derived from")
            return requested
        if any(matches(p, requested) for p in grant.patterns):
            return requested
        raise AuthFailed(f"subdomain '{requested}' not authorized for this token")
    if grant.patterns is None:
        return open_subdomain(token)
    if not grant.patterns:
        raise AuthFailed("no subdomain authorized for this token")
    return list(grant.patterns)


def _verify_url(provider: str) -> str:
    """`{provider}/api/verify`, keeping any path prefix and tolerating a trailing slash."""
    url = DecodedURL.from_text(provider)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an http:// or https:// auth provider URL")
    return url.child("api", "verify").to_text()


def _provider_patterns(body: bytes) -> list[str] | None:
    """The `subdomains` of a 200 answer, or None if the answer is not `{"subdomains": [str...]}`."""
    answer = _json(body)
    if not isinstance(answer, dict):
        return None
    patterns = answer.get("subdomains")
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        return None
    return patterns


def _provider_error(body: bytes) -> str | None:
    """The `error` text of a 401/403 answer, if it has a non-empty one."""
    answer = _json(body)
    error = answer.get("error") if isinstance(answer, dict) else None
    return error if isinstance(error, str) and error.strip() else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


class _TooLarge(Exception):
    pass


class _CappedBody(Protocol):
    """Collects a response body up to `limit` bytes.

    Unlike treq's `collect`, cancelling it (our timeout) or exceeding the
    limit drops the connection, so a stalled provider leaves no socket open.
    """

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _: self._drop())
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(_TooLarge(f"answer larger than {self._limit} bytes"))
            self._drop()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


async def _read_capped(response: IResponse, limit: int) -> bytes:
    body = _CappedBody(limit)
    response.deliverBody(body)
    return await body.done
