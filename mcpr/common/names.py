"""Subdomain labels and the patterns that grant them.

A tunnel's public name is one DNS label under the relay's domain.  Tokens are
granted labels through patterns with at most one `*` (any run of characters,
also empty), as in the original mcpr's auth-provider contract.  Matching is a
prefix/suffix test rather than a regular expression built from the pattern,
so nothing a provider sends can change what the matcher means.  Both daemons
need this grammar: the relay to grant names, the gateway to check a name
typed at its prompt.
"""

from __future__ import annotations

import re

LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_LABEL = 63
WILDCARD = "*"

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def valid_label(label: object) -> bool:
    """Whether `label` is a lower-case DNS label: what the relay accepts as a subdomain.

    It takes any object because the label usually comes straight out of a
    client's JSON message, where it may be a number or a list.
    """
    return isinstance(label, str) and LABEL.fullmatch(label) is not None


def parse_pattern(text: str) -> str:
    """Check a subdomain pattern and return it unchanged, or raise `ValueError`.

    Besides at most one `*`, a pattern holds only label characters (lower-case
    letters, digits, `-`; matching is case-sensitive, so an upper-case pattern
    could never match and is refused rather than silently useless).  It may
    not begin or end with `-` and, without its `*`, is at most 63 characters:
    patterns that could match no label are configuration mistakes.  So a
    pattern without `*` is always a valid label (`is_concrete`).
    """
    problem = _pattern_problem(text)
    if problem is not None:
        raise ValueError(f"expected a subdomain pattern with at most one '*' and otherwise "
                         f"only a-z, 0-9 and '-', got {text!r}: {problem}")
    return text


def _pattern_problem(text: str) -> str | None:
    if not text:
        return "empty"
    if text.count(WILDCARD) > 1:
        return "more than one '*'"
    fixed = text.replace(WILDCARD, "")
    if not _LABEL_CHARS.issuperset(fixed):
        return "invalid character"
    if text.startswith("-") or text.endswith("-"):
        return "a label cannot begin or end with '-'"
    if len(fixed) > MAX_LABEL:
        return f"longer than {MAX_LABEL} characters"
    return None


def matches(pattern: str, subdomain: str) -> bool:
    """Whether `subdomain` matches `pattern` (one from `parse_pattern`).

    The `*` stands for any run of characters, also empty, so `pattern` splits
    into a prefix and a suffix that must both fit without overlapping.  A
    second `*` (an unchecked pattern) stays in the suffix, where it matches
    nothing, since `*` never occurs in a label: unchecked input fails closed.
    """
    prefix, wildcard, suffix = pattern.partition(WILDCARD)
    if not wildcard:
        return pattern == subdomain
    return (len(subdomain) >= len(prefix) + len(suffix)
            and subdomain.startswith(prefix) and subdomain.endswith(suffix))


def is_concrete(pattern: str) -> bool:
    """Whether `pattern` names one subdomain that a client can be given as is."""
    return WILDCARD not in pattern
