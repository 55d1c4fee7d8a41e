"""Subdomain labels and patterns, checked against independent references."""

from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcpr.common.names import LABEL, is_concrete, matches, parse_pattern, valid_label
from mcpr.relay.identity import open_subdomain, owner_id, token_hint

# Only label characters and '*': fnmatch gives '?' and '[' meanings of their own.
LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
chunks = st.text(alphabet=LABEL_CHARS, max_size=8)
labels = st.from_regex(LABEL, fullmatch=True)
raw_patterns = st.one_of(chunks, st.builds(lambda a, b: f"{a}*{b}", chunks, chunks))


def is_valid_pattern(text: str) -> bool:
    try:
        parse_pattern(text)
    except ValueError:
        return False
    return True


class LabelTests(SynchronousTestCase):
    """valid_label: what one DNS label of a tunnel's subdomain may be."""

    def test_edges(self) -> None:
        """Lengths, hyphens, case, and values that are not strings."""
        for good in ["a", "0", "a" * 63, "a-b", "a--b", "xn--bcher-kva", "9lives"]:
            self.assertTrue(valid_label(good), good)
        for bad in ["", "a" * 64, "-a", "a-", "-", "A", "aBc", "a.b", "a_b", "a b", "é",
                    "a\n", "\na", "*", None, 5, b"abc"]:
            self.assertFalse(valid_label(bad), repr(bad))

    @given(labels)
    def test_generated_labels_are_valid(self, label: str) -> None:
        self.assertTrue(valid_label(label))
        self.assertLessEqual(len(label), 63)


class MatchTests(SynchronousTestCase):
    """matches: a subdomain pattern with at most one `*`, against fnmatch and hand-picked cases."""

    @given(raw_patterns, st.text(alphabet=LABEL_CHARS, max_size=20))
    def test_agrees_with_fnmatch(self, pattern: str, subdomain: str) -> None:
        self.assertEqual(matches(pattern, subdomain), fnmatchcase(subdomain, pattern))

    @given(chunks, chunks, chunks)
    def test_prefix_middle_suffix_matches(self, prefix: str, middle: str, suffix: str) -> None:
        # Random subjects rarely match: build ones that do, with any middle, also empty.
        self.assertTrue(matches(f"{prefix}*{suffix}", prefix + middle + suffix))

    @given(labels, labels)
    def test_concrete_pattern_matches_only_itself(self, pattern: str, subdomain: str) -> None:
        self.assertTrue(matches(pattern, pattern))
        self.assertEqual(matches(pattern, subdomain), pattern == subdomain)

    @given(labels)
    def test_star_matches_every_label(self, label: str) -> None:
        self.assertTrue(matches("*", label))

    def test_prefix_and_suffix_cases(self) -> None:
        self.assertTrue(matches("alice-*", "alice-dev"))
        self.assertTrue(matches("alice-*", "alice-"))
        self.assertFalse(matches("alice-*", "alice"))
        self.assertFalse(matches("alice-*", "bob-alice-dev"))
        self.assertTrue(matches("*-prod", "api-prod"))
        self.assertFalse(matches("*-prod", "api-prod2"))
        self.assertTrue(matches("a*a", "aa"))
        # Prefix and suffix may not share the subject's characters.
        self.assertFalse(matches("ab*ba", "aba"))
        self.assertTrue(matches("ab*ba", "abba"))

    def test_case_sensitive(self) -> None:
        self.assertFalse(matches("Alice*", "alice"))
        self.assertFalse(matches("alice", "Alice"))

    @given(chunks, chunks, chunks, labels)
    def test_unchecked_second_star_fails_closed(self, a: str, b: str, c: str, label: str) -> None:
        self.assertFalse(matches(f"{a}*{b}*{c}", label))

    def test_no_regex_meaning(self) -> None:
        self.assertFalse(matches("a.c", "abc"))
        self.assertFalse(matches("a?c", "abc"))
        self.assertFalse(matches("[a]*", "a"))


class ParsePatternTests(SynchronousTestCase):
    """parse_pattern: which patterns a token may carry, and the messages for those it may not."""

    def test_accepts(self) -> None:
        for good in ["*", "alice", "alice-*", "*-prod", "a*z", "a" * 63, "a" * 30 + "*" + "b" * 33]:
            self.assertEqual(parse_pattern(good), good)

    def test_refuses_with_a_clear_message(self) -> None:
        for bad in ["", "**", "a*b*", "Alice*", "a.b", "a_*", "a?", "[a]*", " a", "-*", "*-",
                    "-a", "a" * 64, "a" * 32 + "*" + "b" * 32, "é*"]:
            with self.assertRaises(ValueError, msg=repr(bad)) as caught:
                parse_pattern(bad)
            self.assertIn("expected a subdomain pattern with at most one '*'", str(caught.exception))
            self.assertIn(repr(bad), str(caught.exception))

    @given(raw_patterns)
    def test_valid_concrete_patterns_are_labels(self, pattern: str) -> None:
        if is_valid_pattern(pattern) and is_concrete(pattern):
            self.assertTrue(valid_label(pattern))

    @given(raw_patterns)
    def test_accepted_exactly_by_the_documented_rule(self, pattern: str) -> None:
        fixed = pattern.replace("*", "")
        expected = (pattern != "" and not pattern.startswith("-") and not pattern.endswith("-")
                    and len(fixed) <= 63)
        self.assertEqual(is_valid_pattern(pattern), expected)

    def test_is_concrete(self) -> None:
        self.assertTrue(is_concrete("alice"))
        self.assertFalse(is_concrete("alice-*"))
        self.assertFalse(is_concrete("*"))


class TokenIdentityTests(SynchronousTestCase):
    """The names derived from a token: owner id, open-mode subdomain and log hint."""

    def test_known_vector(self) -> None:
        """The derived names on sha256("abc"), a published test vector."""
        digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
        self.assertEqual(owner_id("abc"), digest)
        self.assertEqual(open_subdomain("abc"), digest[:12])
        self.assertEqual(token_hint("abc"), digest[:8])

    @given(st.text(min_size=1))
    def test_derived_names(self, token: str) -> None:
        """Every token gives a valid 12-character subdomain that starts with its hint."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        self.assertEqual(owner_id(token), digest)
        self.assertTrue(valid_label(open_subdomain(token)))
        self.assertEqual(len(open_subdomain(token)), 12)
        self.assertTrue(open_subdomain(token).startswith(token_hint(token)))

    def test_lone_surrogate_token_still_hashes(self) -> None:
        # json.loads('"\\ud800"') gives such a string; it must not crash the relay.
        self.assertEqual(len(owner_id("\ud800")), 64)
        self.assertTrue(valid_label(open_subdomain("\ud800x")))
