"""What went wrong with an outgoing HTTP call, in one line.

twisted.web's client wraps the real cause of a failed request in
`ResponseNeverReceived`/`ResponseFailed`, whose `reasons` hold Failures; a
cancelled call (our own timeout, or our caller giving up) surfaces the same
way.  Both daemons make such calls (the gateway to its upstream, the relay
to its auth provider), and both must tell "we cancelled it" from "it failed"
and log the cause, not the wrapper.
"""

from __future__ import annotations

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError


def causes(error: BaseException) -> list[BaseException]:
    """`error`, or the causes a twisted.web `ResponseFailed`-like error wraps in `reasons`."""
    reasons = getattr(error, "reasons", None)
    return [f.value for f in reasons] if reasons else [error]


def cancelled(error: BaseException) -> bool:
    """Whether the call was cancelled rather than failed."""
    return any(isinstance(cause, CancelledError) for cause in causes(error))


def describe(error: BaseException) -> str:
    """A short reason for a failed call: the first cause, in words for the common network errors."""
    cause = causes(error)[0]
    if cause is not error:
        return describe(cause)
    if isinstance(error, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, neterror.DNSLookupError):
        return "host name lookup failed"
    if isinstance(error, (neterror.TimeoutError, neterror.ConnectingCancelledError)):
        return "connect timed out"
    text = str(error) or type(error).__name__
    return text[:200]
