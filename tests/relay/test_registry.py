"""The registry's ownership rules, without sockets."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.protocol import CloseCode, Refused
from mcpr.relay.registry import Registry


class _Tunnel:
    def __init__(self, subdomain: str, owner: str) -> None:
        self.subdomain = subdomain
        self.owner = owner
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


class RegistryTests(SynchronousTestCase):
    """Registry: one live owner per subdomain, takeovers, and the per-owner tunnel limit."""

    def test_same_owner_takes_over_and_old_cleanup_is_harmless(self) -> None:
        registry = Registry(max_per_owner=8)
        old, new = _Tunnel("a", "alice"), _Tunnel("a", "alice")
        registry.claim(old)
        registry.claim(new)
        self.assertTrue(old.evicted)
        self.assertFalse(registry.release(old), "a stale socket's cleanup removed the newer registration")
        self.assertIs(registry.get("a"), new)
        self.assertTrue(registry.release(new))
        self.assertIsNone(registry.get("a"))

    def test_other_owner_refused(self) -> None:
        registry = Registry(max_per_owner=8)
        registry.claim(_Tunnel("a", "alice"))
        e = self.assertRaises(Refused, registry.claim, _Tunnel("a", "bob"))
        self.assertEqual(e.code, CloseCode.IN_USE)

    def test_tunnels_per_owner(self) -> None:
        registry = Registry(max_per_owner=2)
        registry.claim(_Tunnel("a", "alice"))
        registry.claim(_Tunnel("b", "alice"))
        self.assertEqual(self.assertRaises(Refused, registry.claim, _Tunnel("c", "alice")).code, CloseCode.TOO_MANY)
        registry.claim(_Tunnel("b", "alice"))  # a takeover does not count as another tunnel
        registry.claim(_Tunnel("c", "bob"))
        self.assertEqual(len(registry), 3)

    @given(st.lists(st.tuples(st.sampled_from(["claim", "release"]), st.sampled_from("xyz"),
                              st.sampled_from(["o1", "o2"]), st.integers(0, 3)), max_size=40))
    def test_interleavings_keep_one_live_owner_per_name(self, steps) -> None:
        """Whatever the order of claims and (stale) releases, a name maps to the last tunnel that claimed it
        successfully, until that very tunnel is released."""
        registry = Registry(max_per_owner=100)
        tunnels: dict = {}
        expected: dict = {}
        for action, name, owner, n in steps:
            tunnel = tunnels.setdefault((name, owner, n), _Tunnel(name, owner))
            if action == "claim":
                try:
                    registry.claim(tunnel)
                except Refused:
                    self.assertNotEqual(expected[name].owner, owner)
                    continue
                expected[name] = tunnel
            elif registry.release(tunnel):
                self.assertIs(expected.pop(name), tunnel)
            for key, live in expected.items():
                self.assertIs(registry.get(key), live)
