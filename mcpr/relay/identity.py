"""The identities the relay derives from a token.

Everything the relay remembers or logs about a token is derived from one
SHA-256 digest, so the token itself never has to be kept or written anywhere:
`owner_id` (the registry's owner), `token_hint` (its first 8 hex digits, for
logs) and `open_subdomain` (its first 12, the open mode's default name).  The
hint is therefore a prefix of an open-mode tunnel's subdomain, which lets an
operator match log lines to URLs.
"""

from __future__ import annotations

import hashlib


def _digest(token: str) -> bytes:
    # surrogatepass: a token parsed from JSON may hold a lone surrogate, which
    # strict UTF-8 refuses; such a token must still hash, not crash the relay.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def owner_id(token: str) -> str:
    """The registry owner for `token`: its SHA-256 in hex, stable across restarts and nodes."""
    return _digest(token).hex()


def token_hint(token: str) -> str:
    """A short, non-reversible name for `token` in logs (which never show the token)."""
    return _digest(token).hex()[:8]


def open_subdomain(token: str) -> str:
    """Open mode's subdomain for a client that asks for none: the first 6 bytes of
    SHA-256(token) in hex, as in the original mcpr, so a token keeps its URL."""
    return _digest(token)[:6].hex()
