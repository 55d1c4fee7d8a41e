# -*- test-case-name: tests.relay.test_cluster_directory -*-
"""The cluster-wide name directory: which node serves which subdomain, kept in Redis.

On one node the registry (`mcpr.relay.registry`) decides who may take a name;
with several nodes the same rules must hold across all of them, so the facts
they rest on live in Redis, and every decision is one Lua script, which Redis
runs atomically: two nodes claiming one name at once cannot both win.

The schema (`prefix` is "mcpr:" unless configured), per subdomain NAME:

- `<prefix>live:NAME` = "EPOCH NODE OWNER": the tunnel that serves NAME, on
  the node whose internal URL is NODE, registered by OWNER.  It expires after
  `ttl` (PX) unless its node refreshes it (every ttl/3, `Heartbeat`), so a
  dead node loses its names within `ttl`.  OWNER comes last and a value is
  split at the first two spaces, so an owner may hold any character (those of
  provider mode are the provider's strings); EPOCH is decimal and NODE a URL,
  neither has a space.
- `<prefix>owner:NAME` = "OWNER": the reservation.  Set and refreshed with
  the live key but for `ttl + grace`, so it outlives its tunnel, and a node
  that dies, by `grace`: the cluster-wide equivalent of one relay's
  reservation of a dropped name for its last owner.
- `<prefix>epoch`: an INCR counter, a fencing token: every claim gets a new
  one, so the value of a live key names one registration, never two.

Releases and refreshes compare the whole live value, not the epoch alone: the
counter starts again at 1 after a Redis restart that lost it, but two nodes
still cannot hold equal values because the node is part of the value.

Every call is bounded by `timeout`: a Redis that is down, or up but not
answering, raises `DirectoryUnavailable` instead of holding a registration
open.  The connection (`redis_connection`) reconnects by itself, and the
heartbeat re-creates the keys of every tunnel its node holds, so a Redis that
comes back empty is repopulated within ttl/3 without anyone's help.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcpr.common.protocol import CloseCode, Refused
from mcpr.common.settings import parse_text
from mcpr.relay.registry import IN_USE, reserved

log = Logger()

DEFAULT_PORT = 6379
# The longest wait between two attempts to reconnect to Redis (txredisapi's own is 10 s): it
# bounds how long a node keeps refusing registrations after Redis is back, like the heartbeat's
# ttl/3 does (5 s by default); more often would only add log lines while Redis is down (Twisted's
# ClientService logs each attempt).
RECONNECT_MAX_DELAY = 5.0
# At most this many names per refresh script: Redis runs a script alone, so one holding every
# name of a big node would stall every other node's claims for as long as it runs.
REFRESH_BATCH = 500

_URL_FORM = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]"


class DirectoryUnavailable(Exception):
    """Redis cannot be reached or refused the command; str() says why in one line, no secrets."""


@dataclass(frozen=True)
class Placement:
    """One registration as the directory holds it."""

    name: str  # the subdomain
    node: str  # the holder's node URL, e.g. "http://10.0.0.5:7000"
    owner: str
    epoch: int
    value: str  # the live key's whole value: what release and refresh compare


@dataclass(frozen=True)
class Claimed:
    """A successful claim: ours now, and where the owner's previous tunnel of that name is."""

    placement: Placement
    # The node of the same owner's previous tunnel of this name when another node holds it (the
    # caller has it evicted there); None when there was none or it is on this node (the local
    # registry evicts it).
    previous: str | None


class RedisClient(Protocol):
    """What the directory uses of a txredisapi connection (`redis_connection`)."""

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]: ...

    def get(self, key: str) -> Deferred[Any]: ...

    def ping(self) -> Deferred[Any]: ...

    def disconnect(self) -> Deferred[Any]: ...


@dataclass(frozen=True)
class _Address:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None


def _address(value: Any) -> _Address:
    """The parts of a Redis URL; ValueError saying the expected form, never repeating the value
    (it may hold a password)."""
    parts = urlsplit(parse_text(value))
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"expected a Redis URL, {_URL_FORM}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"expected a Redis URL with a port 1-65535, {_URL_FORM}") from None
    db = parts.path.lstrip("/") or "0"
    if not db.isdigit() or parts.path.count("/") > 1:
        raise ValueError(f"expected a database number after the host, e.g. redis://HOST:{DEFAULT_PORT}/0")
    if parts.query or parts.fragment:
        raise ValueError(f"expected nothing after the database number, {_URL_FORM}")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if username is not None and not password:
        raise ValueError("a Redis user name needs its password: redis://USER:PASSWORD@HOST")
    return _Address(parts.hostname, port, int(db), username, password or None)


def parse_redis_url(value: Any) -> str:
    """A Setting parser for `--cluster`: the URL unchanged, or ValueError with the expected form.

    A password with characters that URLs reserve (`@`, `/`, `:`, `%`, ...) is
    written percent-encoded: `p@ss` is `p%40ss`.
    """
    _address(value)
    return parse_text(value)


def redacted_redis_url(url: str) -> str:
    """`url` as logs may show it: host, port and database, no user name or password."""
    address = _address(url)
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"redis://{host}:{address.port}/{address.db}"


def redis_connection(url: str, reactor: Any, *, timeout: float = 2.0) -> RedisClient:
    """A connection to the Redis of `url`, made in the background and remade whenever it is lost.

    It is lazy: commands sent while it is not connected wait for it (the
    directory bounds that wait with its own timeout).  A command whose reply
    takes longer than `timeout` drops the connection, so one to a host that
    vanished without a reset is noticed and remade; give the `Directory` the
    same timeout.  The password goes only to Redis's AUTH, never to a log or
    an error.  `disconnect()` closes it for good (relay stop).
    """
    return _Connection(_address(url), reactor, timeout)


class _Connection:
    """txredisapi's lazy connection, made anew whenever txredisapi gives up on it.

    txredisapi stops reconnecting for good when the AUTH or SELECT of a new
    connection fails, whatever the reason: a wrong password, but also a reply
    that timed out or a connection lost meanwhile (a Redis that hung or
    restarted at that moment), after which the node would never reach Redis
    again.  A call made once it has given up starts another connection, at
    most every RECONNECT_MAX_DELAY: a refused password is then retried (and
    logged by txredisapi, without the password) like an outage, so fixing it
    on the Redis side is enough.
    """

    def __init__(self, address: _Address, reactor: Any, timeout: float) -> None:
        self._address = address
        self._reactor = reactor
        self._timeout = timeout
        self._closing: list[Deferred[Any]] = []
        self._closed = False
        self._factory = self._connect()

    def _connect(self) -> Any:
        address = self._address
        factory = txredisapi.RedisFactory(
            f"{address.host}:{address.port}", address.db, 1, isLazy=True, password=address.password,
            username=address.username, replyTimeout=self._timeout, convertNumbers=False)
        factory.maxDelay = RECONNECT_MAX_DELAY
        # Fires once connected (nobody waits for that: calls wait on their own), or fails when
        # AUTH or SELECT did, which txredisapi logs.
        factory.deferred.addErrback(lambda _: None)
        endpoint = HostnameEndpoint(self._reactor, address.host, address.port, timeout=self._timeout)
        factory.startConnecting(endpoint)
        self._made = self._reactor.seconds()
        return factory

    def _handler(self) -> Any:
        if self._factory.stopped and not self._closed and \
                self._reactor.seconds() - self._made >= RECONNECT_MAX_DELAY:
            self._closing = [d for d in self._closing if not d.called]
            self._closing.append(self._factory.disconnect())
            self._factory = self._connect()
        return self._factory.handler

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self._handler().eval(script, keys, args)

    def get(self, key: str) -> Deferred[Any]:
        return self._handler().get(key)

    def ping(self) -> Deferred[Any]:
        return self._handler().ping()

    def disconnect(self) -> Deferred[Any]:
        self._closed = True
        return DeferredList([*self._closing, self._factory.disconnect()])


# KEYS: live, owner, epoch.  ARGV: owner, node, assigned ("1" or "0"), ttl ms, grace ms.
# -> {"in_use"} | {"reserved", ms left} | {"claimed", epoch, value, previous node or ""}
_CLAIM = """
local live = redis.call('GET', KEYS[1])
local previous = ''
if live then
  local _, node, holder = string.match(live, '^(%d+) (%S+) (.*)$')
  if holder ~= ARGV[1] then return {'in_use'} end
  previous = node
else
  local reserved = redis.call('GET', KEYS[2])
  if reserved and reserved ~= ARGV[1] and ARGV[3] ~= '1' then
    return {'reserved', redis.call('PTTL', KEYS[2])}
  end
end
local epoch = redis.call('INCR', KEYS[3])
local value = epoch .. ' ' .. ARGV[2] .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[4]) + tonumber(ARGV[5]))
return {'claimed', epoch, value, previous}
"""

# KEYS: live, owner.  ARGV: our live value, owner, grace ms.  -> 1 if released, 0 if not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: live1, owner1, live2, owner2, ...  ARGV: ttl ms, grace ms, value1, owner1, value2, ...
# -> the positions (1-based) of the names that another registration holds now.  A missing live
# key is re-created (Redis restarted, or this node was cut off for longer than ttl) unless the
# name is reserved for another owner: then that owner's claim came and went meanwhile.
_REFRESH = """
local ttl, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
local lost = {}
for i = 1, #KEYS, 2 do
  local value, owner = ARGV[i + 2], ARGV[i + 3]
  local live = redis.call('GET', KEYS[i])
  local ours = live == value
  if not live then
    local reserved = redis.call('GET', KEYS[i + 1])
    ours = not reserved or reserved == owner
  end
  if ours then
    redis.call('SET', KEYS[i], value, 'PX', ttl)
    redis.call('SET', KEYS[i + 1], owner, 'PX', ttl + grace)
  else
    lost[#lost + 1] = (i + 1) / 2
  end
end
return lost
"""


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _placement(name: str, value: str) -> Placement:
    epoch, node, owner = value.split(" ", 2)
    return Placement(name=name, node=node, owner=owner, epoch=int(epoch), value=value)


class Directory:
    """The claims, releases, refreshes and look-ups of one node (`node`, its internal URL)."""

    def __init__(self, redis: RedisClient, node: str, *, ttl: float = 15.0, grace: float, prefix: str = "mcpr:",
                 timeout: float = 2.0, clock: IReactorTime) -> None:
        if not node or any(c.isspace() for c in node):
            raise ValueError(f"a node URL without spaces is needed, not {node!r}")
        self._redis = redis
        self.node = node
        self.ttl = ttl
        self._grace = grace
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock

    async def close(self) -> None:
        """The relay stops (after the heartbeat): the connection to Redis goes for good."""
        await self._redis.disconnect()

    def _keys(self, name: str) -> list[str]:
        return [f"{self._prefix}live:{name}", f"{self._prefix}owner:{name}"]

    def _call(self, method: Callable[..., Deferred[Any]], *args: Any) -> Deferred[Any]:
        """`method(*args)` on the connection, failing with DirectoryUnavailable on any Redis error
        or after `timeout` (cancelling a txredisapi call is safe: a reply that comes later is
        read and dropped, and a call still waiting for a connection is never sent)."""
        d = maybeDeferred(method, *args)
        d.addTimeout(self._timeout, self._clock)
        return d.addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> None:
        if failure.check(defer.TimeoutError):
            raise DirectoryUnavailable(f"Redis did not answer within {self._timeout:g} s")
        if failure.check(txredisapi.ResponseError):
            raise DirectoryUnavailable(f"Redis refused the command: {failure.getErrorMessage()}")
        if failure.check(txredisapi.RedisError):
            raise DirectoryUnavailable(f"Redis connection failed: {failure.getErrorMessage()}")
        failure.raiseException()

    async def claim(self, name: str, owner: str, *, assigned: bool) -> Claimed:
        """Take `name` for `owner` on this node, by the registry's rules: a live name is taken
        over only by its owner; a reserved one only by its owner or when `assigned` (the
        grant names it exactly).  Raises `Refused` (4003) or `DirectoryUnavailable`."""
        reply = await self._call(
            self._redis.eval, _CLAIM, [*self._keys(name), f"{self._prefix}epoch"],
            [owner, self.node, "1" if assigned else "0", _ms(self.ttl), _ms(self._grace)])
        if reply[0] == "in_use":
            raise Refused(CloseCode.IN_USE, IN_USE)
        if reply[0] == "reserved":
            left = max(1, math.ceil(reply[1] / 1000))
            raise reserved(left)
        _, epoch, value, previous = reply
        placement = Placement(name=name, node=self.node, owner=owner, epoch=int(epoch), value=value)
        return Claimed(placement, previous if previous and previous != self.node else None)

    async def release(self, placement: Placement) -> None:
        """Give the name up when its tunnel closes, leaving the reservation for `grace`; a no-op
        when another registration holds it now.  Errors are logged, never raised: the key
        expires after `ttl` anyway."""
        try:
            await self._call(self._redis.eval, _RELEASE, self._keys(placement.name),
                             [placement.value, placement.owner, _ms(self._grace)])
        except DirectoryUnavailable as e:
            log.warn("Could not release {name} in the cluster directory ({why}); it expires in {ttl:g} s",
                     name=placement.name, why=str(e), ttl=self.ttl)

    async def locate(self, name: str) -> Placement | None:
        """Who serves `name` now, if anyone.  Raises `DirectoryUnavailable`."""
        value = await self._call(self._redis.get, self._keys(name)[0])
        if value is None:
            return None
        try:
            return _placement(name, value)
        except ValueError:
            raise DirectoryUnavailable(f"Redis holds an unreadable entry for {name!r}") from None

    async def refresh(self, held: Iterable[Placement]) -> list[str]:
        """Keep the names this node holds alive for another `ttl`, re-creating those Redis lost;
        returns the names another registration holds now (the caller evicts their tunnels).
        With nothing held it pings, so that a node without tunnels notices outages too.
        Raises `DirectoryUnavailable`."""
        placements = list(held)
        if not placements:
            await self._call(self._redis.ping)
            return []
        # Every batch is sent before any reply is awaited: a release issued once the refresh has
        # begun is then queued behind all of them, so no batch re-creates a name just released.
        batches = [placements[i:i + REFRESH_BATCH] for i in range(0, len(placements), REFRESH_BATCH)]
        sent = [self._call(self._redis.eval, _REFRESH, [key for p in batch for key in self._keys(p.name)],
                           [_ms(self.ttl), _ms(self._grace), *(part for p in batch for part in (p.value, p.owner))])
                for batch in batches]
        results = await DeferredList(sent, consumeErrors=True)
        lost: list[str] = []
        for (ok, result), batch in zip(results, batches):
            if not ok:
                result.raiseException()
            lost.extend(batch[position - 1].name for position in result)
        return lost


class Heartbeat(Service):
    """Every ttl/3: `directory.refresh(held())`, and `lost(name)` for each name lost to another
    node (the caller evicts that tunnel with 4002).

    A refresh that fails leaves `available` False until one succeeds; the
    relay keeps serving its tunnels meanwhile (their keys outlive two missed
    beats), and can refuse new registrations at once instead of waiting for
    a claim to time out.  An outage is one warning and its end one line, not
    a line per beat.  A beat starts only once the previous one has ended, so
    a slow Redis never has two refreshes of the same names in flight.
    """

    def __init__(self, directory: Directory, held: Callable[[], Iterable[Placement]],
                 lost: Callable[[str], None], clock: IReactorTime) -> None:
        self._directory = directory
        self._held = held
        self._lost = lost
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self._beat()))
        self._loop.clock = clock
        self._done: Deferred[LoopingCall] | None = None
        self.available = True

    def startService(self) -> None:
        super().startService()
        # At once: with nothing held yet this is a ping, which reports a Redis that is down
        # from the start.
        self._done = self._loop.start(self._directory.ttl / 3, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop beating; fires once a refresh under way (bounded by the directory's timeout)
        has ended."""
        super().stopService()
        done, self._done = self._done, None
        if done is None:
            return succeed(None)
        self._loop.stop()
        return done.addCallback(lambda _: None)

    async def _beat(self) -> None:
        held = {placement.name: placement for placement in self._held()}
        try:
            lost = await self._directory.refresh(held.values())
        except DirectoryUnavailable as e:
            if self.available:
                self.available = False
                log.warn("Cluster directory unavailable ({why}): local tunnels are still served, new "
                         "registrations are refused until it is back", why=str(e))
            return
        except Exception:
            # A bug must not stop the heartbeat: every name of this node would expire.
            log.failure("Cluster heartbeat failed")
            return
        if not self.available:
            self.available = True
            log.info("Cluster directory available again")
        if not lost:
            return
        # Only names still held as they were refreshed: one claimed again while the refresh ran
        # (its owner reconnected) is another registration, which the next beat checks.
        now = {placement.name: placement for placement in self._held()}
        for name in lost:
            if now.get(name) != held[name]:
                continue
            try:
                self._lost(name)
            except Exception:
                log.failure("Could not evict {name}, now held by another node", name=name)

