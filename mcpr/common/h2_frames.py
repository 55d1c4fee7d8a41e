"""Cheap `repr` for HTTP/2 frames, which h2 computes for every frame it receives.

h2 4.x logs each received frame at trace level, `logger.trace("Received
frame: %s", repr(frame))`, and evaluates the `repr` even when nothing logs
(its default logger is a no-op).  hyperframe's `Frame.__repr__` serialises
the frame's body again and hex-encodes it: about a fifth of the CPU of a
bulk transfer through a tunnel, in the relay and in the gateway alike.  No
other code of ours or of h2's uses frame reprs, so they are made cheap here,
once, for both daemons: type, stream id and flags, without the body.

Checked against h2 4.4 and hyperframe 6.1; if hyperframe changes `__repr__`,
this only makes debugging output terser.
"""

from __future__ import annotations

from hyperframe.frame import Frame


def _repr(frame: Frame) -> str:
    return f"{type(frame).__name__}(stream_id={frame.stream_id}, flags={sorted(frame.flags)})"


Frame.__repr__ = _repr  # type: ignore[method-assign]
