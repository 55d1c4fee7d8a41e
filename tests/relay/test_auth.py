"""Who may register which subdomain: static tokens, a real auth provider on loopback, open mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpr.common.names import LABEL, matches
from mcpr.common.protocol import Refused
from mcpr.relay.auth import (
    Authenticator,
    AuthFailed,
    Grant,
    StaticToken,
    authorize,
    parse_static_token,
)
from mcpr.relay.identity import open_subdomain, owner_id, token_hint
from tests.support.loopback import TrackingSite, listen
from tests.support.processes import free_port

TOKEN = "tok-3f9a1c-secret-value"
SECRET = "relay-shared-secret"


def capture_logs(testcase: SynchronousTestCase) -> list[dict]:
    """Every log event emitted during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def refusal(testcase: SynchronousTestCase, d: Deferred) -> AuthFailed:
    return testcase.failureResultOf(d, AuthFailed).value


def authenticate(auth: Authenticator, token: Any, subdomain: str | None = None) -> Deferred[Grant]:
    return Deferred.fromCoroutine(auth.authenticate(token, subdomain))


class StaticTokenTests(SynchronousTestCase):
    """Static token specs (`token:pattern,...`): parsing, checks, and never repeating the token."""

    def test_parse(self) -> None:
        self.assertEqual(parse_static_token("abc:alice,alice-*"), StaticToken("abc", ("alice", "alice-*")))
        self.assertEqual(parse_static_token("abc: alice , bob ,"), StaticToken("abc", ("alice", "bob")))
        # Patterns hold no ':', tokens may.
        self.assertEqual(parse_static_token("a:b:c:*"), StaticToken("a:b:c", ("*",)))

    def test_errors_never_repeat_the_token(self) -> None:
        for spec in ["s3cr3t-token", "s3cr3t-token:", ":alice", "s3cr3t-token:Alice", "s3cr3t-token:a**",
                     "s3cr3t-token: , "]:
            with self.assertRaises(ValueError, msg=spec) as caught:
                parse_static_token(spec)
            self.assertNotIn("s3cr3t", str(caught.exception))

    def test_constructed_directly_is_checked_too(self) -> None:
        self.assertRaises(ValueError, StaticToken, "", ("a",))
        self.assertRaises(ValueError, StaticToken, "t", ())
        self.assertRaises(ValueError, StaticToken, "t", ("a.b",))

    def test_repr_hides_the_token(self) -> None:
        self.assertNotIn("s3cr3t", repr(StaticToken("s3cr3t", ("alice",))))


class AuthFailedTests(SynchronousTestCase):
    """AuthFailed's close reason: fits a close frame, whatever the text."""

    def test_reason_fits_a_close_frame(self) -> None:
        reason = AuthFailed("é" * 200).reason
        self.assertLessEqual(len(reason.encode()), 120)
        self.assertEqual(reason, "é" * 60)
        self.assertEqual(AuthFailed("invalid token").code, 4001)

    def test_lone_surrogate_does_not_break_encoding(self) -> None:
        self.assertEqual(AuthFailed("bad \ud800 token").reason, "bad ? token")


class LocalModeTests(SynchronousTestCase):
    """Static and open mode: no network, so a fake clock is all the reactor they need."""

    def authenticator(self, *tokens: StaticToken) -> Authenticator:
        auth = Authenticator(Clock(), tokens)
        self.addCleanup(auth.close)
        return auth

    def test_static_match(self) -> None:
        auth = self.authenticator(StaticToken(TOKEN, ("alice", "alice-*")))
        grant = self.successResultOf(authenticate(auth, TOKEN, "alice"))
        self.assertEqual(grant, Grant(owner_id(TOKEN), ("alice", "alice-*"), "static"))

    def test_static_mismatch(self) -> None:
        auth = self.authenticator(StaticToken(TOKEN, ("alice",)))
        for wrong in [TOKEN + "x", TOKEN[:-1], "", TOKEN.upper(), "é"]:
            self.assertEqual(refusal(self, authenticate(auth, wrong)).reason, "invalid token")

    def test_several_tokens(self) -> None:
        auth = self.authenticator(StaticToken("t1", ("alice",)), StaticToken("t2", ("bob-*",)),
                                  StaticToken("tëst", ("carol",)), StaticToken("t1", ("alice", "al-*")))
        self.assertEqual(self.successResultOf(authenticate(auth, "t1")).patterns, ("alice", "al-*"))
        self.assertEqual(self.successResultOf(authenticate(auth, "t2")).patterns, ("bob-*",))
        self.assertEqual(self.successResultOf(authenticate(auth, "tëst")).patterns, ("carol",))
        self.assertEqual(auth.static_owners(), {owner_id("t1"), owner_id("t2"), owner_id("tëst")})

    def test_open_mode(self) -> None:
        auth = self.authenticator()
        self.assertEqual(self.successResultOf(authenticate(auth, TOKEN, "anything")),
                         Grant(owner_id(TOKEN), None, "open"))
        self.assertEqual(auth.static_owners(), set())

    def test_a_token_is_always_required(self) -> None:
        for auth in [self.authenticator(), self.authenticator(StaticToken(TOKEN, ("a",)))]:
            for token in ["", None, 42, ["t"]]:
                self.assertEqual(refusal(self, authenticate(auth, token)).reason, "invalid token")

    def test_reload_static(self) -> None:
        auth = self.authenticator(StaticToken("old", ("alice",)))
        auth.reload_static([StaticToken("new", ("bob",))])
        self.assertEqual(refusal(self, authenticate(auth, "old")).reason, "invalid token")
        self.assertEqual(self.successResultOf(authenticate(auth, "new")).patterns, ("bob",))
        self.assertEqual(auth.static_owners(), {owner_id("new")})
        # No static tokens left: the next mode by priority (here open) applies.
        auth.reload_static([])
        self.assertEqual(self.successResultOf(authenticate(auth, "old")).source, "open")


class AuthorizeTests(SynchronousTestCase):
    """authorize(): the subdomain a grant registers, or the patterns it offers."""

    grant = Grant(owner_id(TOKEN), ("alice", "alice-*"), "static")
    open_grant = Grant(owner_id(TOKEN), None, "open")

    def test_requested_and_allowed(self) -> None:
        self.assertEqual(authorize(self.grant, "alice", TOKEN), "alice")
        self.assertEqual(authorize(self.grant, "alice-dev", TOKEN), "alice-dev")

    def test_requested_but_not_allowed(self) -> None:
        with self.assertRaises(AuthFailed) as caught:
            authorize(self.grant, "bob", TOKEN)
        self.assertEqual(caught.exception.reason, "subdomain 'bob' not authorized for this token")
        self.assertEqual(caught.exception.code, 4001)

    def test_invalid_label(self) -> None:
        for bad in ["", "Alice", "alice.dev", "-alice", "a" * 64, 5, ["alice"]]:
            for grant in [self.grant, self.open_grant]:
                with self.assertRaises(Refused, msg=repr(bad)) as caught:
                    authorize(grant, bad, TOKEN)  # type: ignore[arg-type]
                self.assertEqual((caught.exception.code, caught.exception.reason), (4004, "invalid subdomain"))

    def test_open_mode(self) -> None:
        self.assertEqual(authorize(self.open_grant, "whatever", TOKEN), "whatever")
        self.assertEqual(authorize(self.open_grant, None, TOKEN), open_subdomain(TOKEN))

    def test_one_concrete_pattern_is_the_name_whatever_was_asked(self) -> None:
        """The original relay's rule 2: a single pattern without `*` is the name, asked for or not."""
        solo = Grant(owner_id(TOKEN), ("solo",), "static")
        for requested in (None, "solo", "other", "Not A Label"):
            self.assertEqual(authorize(solo, requested, TOKEN), "solo", requested)
        self.assertEqual(authorize(Grant(owner_id(TOKEN), ("solo-*",), "provider"), None, TOKEN), ["solo-*"])

    def test_offer_when_none_requested(self) -> None:
        self.assertEqual(authorize(self.grant, None, TOKEN), ["alice", "alice-*"])

    def test_nothing_to_offer(self) -> None:
        with self.assertRaises(AuthFailed) as caught:
            authorize(Grant(owner_id(TOKEN), (), "provider"), None, TOKEN)
        self.assertEqual(caught.exception.reason, "no subdomain authorized for this token")

    @given(st.lists(st.sampled_from(["*", "a*", "*z", "ab", "a-*", "x*y", "q"]), max_size=4),
           st.from_regex(LABEL, fullmatch=True))
    def test_allowed_exactly_when_a_pattern_matches(self, patterns: list[str], label: str) -> None:
        grant = Grant("owner", tuple(patterns), "provider")
        if len(patterns) == 1 and "*" not in patterns[0]:
            self.assertEqual(authorize(grant, label, TOKEN), patterns[0])
        elif any(matches(p, label) for p in patterns):
            self.assertEqual(authorize(grant, label, TOKEN), label)
        else:
            self.assertRaises(AuthFailed, authorize, grant, label, TOKEN)


@dataclass
class Seen:
    path: bytes
    secret: bytes | None
    cookie: bytes | None
    content_type: bytes | None
    body: Any
    channel: object


class FakeProvider(Resource):
    """An auth provider whose answer each test chooses; it records what it was asked."""

    isLeaf = True

    def __init__(self, answer: Callable[[Request], bytes | int]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[Seen] = []
        self.gone: Deferred[None] = Deferred()
        self.asked: Deferred[None] = Deferred()

    def render_POST(self, request: Request) -> bytes | int:
        self.seen.append(Seen(request.path, request.getHeader(b"x-relay-secret"),
                              request.getHeader(b"cookie"), request.getHeader(b"content-type"),
                              json.loads(request.content.read()), request.channel))
        request.notifyFinish().addErrback(lambda _: self.gone.callback(None))
        if not self.asked.called:
            self.asked.callback(None)
        return self.answer(request)


@implementer(IAgent)
class Answered:
    """An agent that says when a response's head has arrived, i.e. its caller is reading the body
    (the Authenticator's own client does not say)."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent
        self.answered: Deferred[None] = Deferred()

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        def arrived(response: IResponse) -> IResponse:
            # Next turn: by then the caller has taken the response and started reading its body.
            reactor.callLater(0, self.answered.callback, None)
            return response

        return self._agent.request(method, uri, headers, bodyProducer).addCallback(arrived)


def reply(status: int, body: Any, raw: bool = False) -> Callable[[Request], bytes]:
    def answer(request: Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body if raw else json.dumps(body).encode()
    return answer


def never(request: Request) -> int:
    return NOT_DONE_YET


def stall_mid_body(request: Request) -> int:
    request.setHeader(b"content-length", b"100")
    request.write(b'{"subdomains": [')
    return NOT_DONE_YET


class ProviderTests(TestCase):
    """A real provider on 127.0.0.1 behind a real twisted.web Site."""

    async def provider(self, answer: Callable[[Request], bytes | int], *, path: str = "",
                       secret: str | None = SECRET,
                       static: tuple[StaticToken, ...] = (),
                       client: HTTPClient | None = None) -> tuple[Authenticator, FakeProvider]:
        stub = FakeProvider(answer)
        port = await listen(self, TrackingSite(stub))
        auth = Authenticator(reactor, static, f"http://127.0.0.1:{port}{path}", secret, timeout=0.3, client=client)
        self.addCleanup(auth.close)
        return auth, stub

    async def refused(self, auth: Authenticator, token: str = TOKEN, subdomain: str | None = None) -> str:
        try:
            await auth.authenticate(token, subdomain)
        except AuthFailed as e:
            return e.reason
        raise self.failureException("authenticate did not fail")

    def assertQuietAboutSecrets(self, events: list[dict]) -> list[str]:
        """Warnings name the token by its hint; neither the token nor the secret appears."""
        texts = [formatEvent(e) + repr(e) for e in events]
        for text in texts:
            self.assertNotIn(TOKEN, text)
            self.assertNotIn(SECRET, text)
        warnings = [formatEvent(e) for e in events if e.get("token_hint") == token_hint(TOKEN)]
        self.assertTrue(warnings, texts)
        return warnings

    async def test_allowed(self) -> None:
        logs = capture_logs(self)
        auth, stub = await self.provider(reply(200, {"subdomains": ["alice", "Alice", "a**", "alice-*"]}))
        grant = await auth.authenticate(TOKEN, "alice")
        self.assertEqual(grant, Grant(owner_id(TOKEN), ("alice", "alice-*"), "provider"))
        [seen] = stub.seen
        self.assertEqual(seen.path, b"/api/verify")
        self.assertEqual(seen.secret, SECRET.encode())
        self.assertTrue(seen.content_type.startswith(b"application/json"), seen.content_type)
        self.assertEqual(seen.body, {"token": TOKEN, "subdomain": "alice"})
        warnings = self.assertQuietAboutSecrets(logs)
        self.assertEqual(len(warnings), 2)
        self.assertIn("'Alice'", warnings[0])

    async def test_no_subdomain_requested_and_no_secret(self) -> None:
        auth, stub = await self.provider(reply(200, {"subdomains": ["*"]}), secret=None)
        self.assertEqual((await auth.authenticate(TOKEN)).patterns, ("*",))
        # An invalid label is not passed on; authorize() rejects it with 4004.
        await auth.authenticate(TOKEN, "Not A Label")
        self.assertEqual([s.secret for s in stub.seen], [None, None])
        self.assertEqual([s.body for s in stub.seen], [{"token": TOKEN, "subdomain": None}] * 2)

    async def test_path_prefix_and_trailing_slash(self) -> None:
        for path in ["/", "/relay", "/relay/"]:
            auth, stub = await self.provider(reply(200, {"subdomains": []}), path=path)
            await auth.authenticate(TOKEN)
            self.assertEqual(stub.seen[0].path, path.rstrip("/").encode() + b"/api/verify")

    async def test_connection_reused_and_no_cookies_replayed(self) -> None:
        def answer(request: Request) -> bytes:
            request.addCookie(b"session", b"for-the-first-token", path=b"/")
            return b'{"subdomains": ["*"]}'

        auth, stub = await self.provider(answer)
        await auth.authenticate("first")
        await auth.authenticate("second")
        self.assertEqual([s.cookie for s in stub.seen], [None, None])
        # Our own persistent pool: both calls went over one connection.
        self.assertIs(stub.seen[0].channel, stub.seen[1].channel)

    async def test_401_with_the_providers_error(self) -> None:
        auth, _ = await self.provider(reply(401, {"error": "token expired"}))
        self.assertEqual(await self.refused(auth), "token expired")

    async def test_403_without_a_body(self) -> None:
        auth, _ = await self.provider(reply(403, b"", raw=True))
        self.assertEqual(await self.refused(auth), "invalid token")

    async def test_long_provider_error_is_cut(self) -> None:
        auth, _ = await self.provider(reply(403, {"error": "ü" * 300}))
        reason = await self.refused(auth)
        self.assertEqual(reason, "ü" * 60)

    async def test_unavailable(self) -> None:
        cases = {
            "500": reply(500, {"error": "boom"}),
            "malformed": reply(200, b'{"subdomains": [', raw=True),
            "not utf-8": reply(200, b"\xff\xfe", raw=True),
            "wrong shape": reply(200, {"subdomains": "alice"}),
            "not strings": reply(200, {"subdomains": ["alice", 3]}),
            "not an object": reply(200, ["alice"]),
            "deeply nested": reply(200, b"[" * 50000, raw=True),
            "too large": reply(200, {"subdomains": ["a"] * 40000}),  # 200 kB
            "redirect": reply(307, b"", raw=True),
        }

        logs = capture_logs(self)
        for name, answer in cases.items():
            auth, stub = await self.provider(answer)
            self.assertEqual(await self.refused(auth), "auth provider unavailable", name)
            self.assertEqual(len(stub.seen), 1, name)
        warnings = self.assertQuietAboutSecrets(logs)
        self.assertEqual(len(warnings), len(cases))
        self.assertIn("HTTP 500", warnings[0])
        self.assertIn("HTTP 307", warnings[-1])
        self.assertIn("larger than 65536 bytes", warnings[-2])

    async def test_no_answer_times_out_and_drops_the_connection(self) -> None:
        for answer in [never, stall_mid_body]:
            logs = capture_logs(self)
            auth, stub = await self.provider(answer)
            started = reactor.seconds()
            self.assertEqual(await self.refused(auth), "auth provider unavailable")
            self.assertLess(reactor.seconds() - started, 2)
            await stub.gone
            [warning] = self.assertQuietAboutSecrets(logs)
            self.assertIn("no answer within 0.3 s", warning)

    async def test_caller_cancelling_is_not_an_outage(self) -> None:
        """Cancelled before the provider answers, then while it sends the body: the request is
        dropped, and no outage is logged."""
        logs = capture_logs(self)
        auth, stub = await self.provider(never)
        d = authenticate(auth, TOKEN)
        await stub.asked
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await stub.gone

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Answered(Agent(reactor, pool=pool))
        auth, stub = await self.provider(stall_mid_body, client=HTTPClient(agent))
        d = authenticate(auth, TOKEN)
        await agent.answered
        d.cancel()
        self.failureResultOf(d, CancelledError)
        await stub.gone
        self.assertEqual([e for e in logs if e.get("log_level") == LogLevel.warn], [])

    async def test_connection_refused(self) -> None:
        logs = capture_logs(self)
        # HostnameEndpoint reports a refusal only at its next 0.3 s attempt tick.
        auth = Authenticator(reactor, provider=f"http://127.0.0.1:{free_port()}", timeout=2)
        self.addCleanup(auth.close)
        self.assertEqual(await self.refused(auth), "auth provider unavailable")
        [warning] = self.assertQuietAboutSecrets(logs)
        self.assertIn("refused", warning)

    async def test_static_tokens_win_over_the_provider(self) -> None:
        auth, stub = await self.provider(reply(200, {"subdomains": ["*"]}),
                                         static=(StaticToken(TOKEN, ("alice",)),))
        self.assertEqual((await auth.authenticate(TOKEN)).source, "static")
        self.assertEqual(await self.refused(auth, "other"), "invalid token")
        self.assertEqual(stub.seen, [])
        # Once the static tokens are gone, the provider decides.
        auth.reload_static([])
        self.assertEqual((await auth.authenticate(TOKEN)).source, "provider")
        self.assertEqual(len(stub.seen), 1)

    def test_provider_url_must_be_http(self):
        for url in ["ftp://example.com", "example.com", "http://"]:
            self.assertRaises(ValueError, Authenticator, reactor, provider=url)
