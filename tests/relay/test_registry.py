"""The registry's ownership rules, reservations and caps, without sockets (a Clock for time)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.registry import Registry
from mcpr.relay.reservations import ReservationStore

GRACE = 600.0
PEER = "192.0.2.1"


class _Tunnel:
    def __init__(self, subdomain: str, owner: str) -> None:
        self.subdomain = subdomain
        self.owner = owner
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def registry(clock: Clock | None = None, *, per_owner: int = 8, per_peer: int = 100, total: int = 1000,
             reservations: int = 1000, store: ReservationStore | None = None) -> Registry:
    return Registry(clock or Clock(), max_per_owner=per_owner, max_per_peer=per_peer, max_tunnels=total,
                    grace=GRACE, max_reservations=reservations, store=store)


def refusal(r: Registry, tunnel: _Tunnel, peer: str = PEER, **kw: Any) -> Refused:
    try:
        r.claim(tunnel, peer=peer, **kw)
    except Refused as e:
        return e
    raise AssertionError(f"{tunnel.subdomain} was given to {tunnel.owner}")


def claim(r: Registry, tunnel: _Tunnel, peer: str = PEER, **kw: Any) -> _Tunnel:
    r.claim(tunnel, peer=peer, **kw)
    return tunnel


class RegistryTests(SynchronousTestCase):
    """Registry: one live owner per subdomain, takeovers, and the per-owner tunnel limit."""

    def test_same_owner_takes_over_and_old_cleanup_is_harmless(self) -> None:
        r = registry()
        old, new = claim(r, _Tunnel("a", "alice")), claim(r, _Tunnel("a", "alice"))
        self.assertTrue(old.evicted)
        self.assertFalse(r.release(old), "a stale socket's cleanup removed the newer registration")
        self.assertIs(r.get("a"), new)
        self.assertTrue(r.release(new))
        self.assertIsNone(r.get("a"))

    def test_other_owner_refused(self) -> None:
        r = registry()
        claim(r, _Tunnel("a", "alice"))
        e = refusal(r, _Tunnel("a", "bob"))
        self.assertEqual((e.code, e.reason), (CloseCode.IN_USE, "subdomain in use by another token"))
        # Not even a grant naming it exactly takes a live tunnel's name.
        self.assertEqual(refusal(r, _Tunnel("a", "bob"), assigned=True).code, CloseCode.IN_USE)

    def test_tunnels_per_owner(self) -> None:
        r = registry(per_owner=2)
        claim(r, _Tunnel("a", "alice"))
        claim(r, _Tunnel("b", "alice"))
        e = refusal(r, _Tunnel("c", "alice"))
        self.assertEqual((e.code, e.reason), (CloseCode.TOO_MANY, "too many tunnels for this token"))
        claim(r, _Tunnel("b", "alice"))  # a takeover does not count as another tunnel
        claim(r, _Tunnel("c", "bob"))
        self.assertEqual(len(r), 3)

    def test_tunnels_per_address_and_in_all(self) -> None:
        r = registry(per_peer=2, total=3)
        a = claim(r, _Tunnel("a", "o1"), "192.0.2.1")
        claim(r, _Tunnel("b", "o2"), "192.0.2.1")
        e = refusal(r, _Tunnel("c", "o3"), "192.0.2.1")
        self.assertEqual((e.code, e.reason), (CloseCode.TOO_MANY, "too many tunnels from this address"))
        claim(r, _Tunnel("c", "o3"), "192.0.2.2")
        e = refusal(r, _Tunnel("d", "o4"), "192.0.2.3")
        self.assertEqual((e.code, e.reason), (CloseCode.TOO_MANY, "relay full: too many tunnels"))
        # Taking over one's own name adds no tunnel: never refused by a cap, even from elsewhere.
        moved = claim(r, _Tunnel("a", "o1"), "192.0.2.3")
        self.assertTrue(a.evicted)
        # The tunnel moved to .3, so .1 has room again, but the relay is still full.
        self.assertEqual(refusal(r, _Tunnel("e", "o5"), "192.0.2.1").reason, "relay full: too many tunnels")
        r.release(moved)
        claim(r, _Tunnel("e", "o5"), "192.0.2.1")

    @given(st.lists(st.tuples(st.sampled_from(["claim", "release", "wait"]), st.sampled_from("xyz"),
                              st.sampled_from(["o1", "o2"]), st.integers(0, 3)), max_size=40))
    def test_interleavings_keep_one_live_owner_per_name(self, steps: list) -> None:
        """Whatever the order of claims, (stale) releases and waits, a name maps to the last tunnel that
        claimed it successfully, until that very tunnel is released; and a refusal always has a reason:
        a live tunnel of another owner, or a reservation of another owner that has not expired."""
        clock = Clock()
        r = registry(clock)
        tunnels: dict = {}
        live: dict = {}
        dropped: dict = {}  # name -> (owner, when)
        for action, name, owner, n in steps:
            tunnel = tunnels.setdefault((name, owner, n), _Tunnel(name, owner))
            if action == "wait":
                clock.advance(GRACE / 2)
            elif action == "claim":
                try:
                    claim(r, tunnel)
                except Refused:
                    if name in live:
                        self.assertNotEqual(live[name].owner, owner)
                    else:
                        last_owner, when = dropped[name]
                        self.assertNotEqual(last_owner, owner)
                        self.assertLess(clock.seconds(), when + GRACE)
                    continue
                live[name] = tunnel
            elif r.release(tunnel):
                self.assertIs(live.pop(name), tunnel)
                dropped[name] = (owner, clock.seconds())
            for key, held in live.items():
                self.assertIs(r.get(key), held)


class ReservationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.r = registry(self.clock)

    def test_a_dropped_name_stays_its_owners_for_the_grace_period(self) -> None:
        owner = claim(self.r, _Tunnel("mine", "alice"))
        self.r.release(owner)
        self.clock.advance(60)
        e = refusal(self.r, _Tunnel("mine", "mallory"))
        self.assertEqual((e.code, e.reason), (CloseCode.IN_USE, "subdomain reserved for another token for 540 s"))
        self.assertIsNone(self.r.get("mine"))
        back = claim(self.r, _Tunnel("mine", "alice"))
        self.assertIs(self.r.get("mine"), back)
        self.assertIsNone(self.r.reservation("mine"), "a live name needs no reservation")

    def test_the_reservation_ends(self) -> None:
        self.r.release(claim(self.r, _Tunnel("mine", "alice")))
        self.clock.advance(GRACE - 1)
        refusal(self.r, _Tunnel("mine", "bob"))
        self.clock.advance(1)
        claim(self.r, _Tunnel("mine", "bob"))

    def test_an_explicit_assignment_beats_a_reservation(self) -> None:
        """Static tokens or the provider gave this exact name to the newcomer (e.g. a rotated token)."""
        self.r.release(claim(self.r, _Tunnel("alice", "old-token")))
        claim(self.r, _Tunnel("alice", "new-token"), assigned=True)

    def test_caps_apply_to_a_reserved_name_taken_back(self) -> None:
        r = registry(self.clock, per_owner=1)
        r.release(claim(r, _Tunnel("a", "alice")))
        claim(r, _Tunnel("b", "alice"))
        self.assertEqual(refusal(r, _Tunnel("a", "alice")).code, CloseCode.TOO_MANY)

    def test_at_most_max_reservations_the_oldest_give_way(self) -> None:
        r = registry(self.clock, reservations=2)
        for name in "abc":
            r.release(claim(r, _Tunnel(name, "alice")))
            self.clock.advance(1)
        self.assertIsNone(r.reservation("a"))
        self.assertEqual([r.reservation(n) is not None for n in "bc"], [True, True])
        claim(r, _Tunnel("a", "bob"))

    def test_revocation_forgets_tunnels_and_reservations(self) -> None:
        kept = claim(self.r, _Tunnel("k", "keep"))
        gone = claim(self.r, _Tunnel("g", "revoked"))
        self.r.release(claim(self.r, _Tunnel("old", "revoked")))
        self.assertEqual(self.r.revoke_all_but({"keep"}), [gone])
        self.assertIsNone(self.r.get("g"))
        self.assertFalse(self.r.release(gone), "a revoked tunnel leaves no reservation")
        self.assertIs(self.r.get("k"), kept)
        claim(self.r, _Tunnel("g", "other"))
        claim(self.r, _Tunnel("old", "other"))


def sync(f: Any) -> Deferred:
    """Runs a store's call at once, on this thread (SQLite in memory)."""
    try:
        return succeed(f())
    except Exception:
        return fail()


class RestoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = ReservationStore(":memory:", self.clock, sync)
        self.r = registry(self.clock, store=self.store)

    def test_claims_wait_for_the_stored_reservations(self) -> None:
        self.assertFalse(self.r.restored)
        waiting = self.r.when_restored()
        cancelled = self.r.when_restored()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.assertNoResult(waiting)
        now = self.clock.seconds()
        self.r.restore([("gone", "alice", now - 1), ("mine", "alice", now + 30), ("theirs", "revoked", now + 30)],
                       keep=lambda owner: owner != "revoked")
        self.successResultOf(waiting)
        self.successResultOf(self.r.when_restored())
        self.assertEqual(refusal(self.r, _Tunnel("mine", "bob")).code, CloseCode.IN_USE)
        claim(self.r, _Tunnel("gone", "bob"))
        claim(self.r, _Tunnel("theirs", "bob"))
