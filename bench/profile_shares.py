"""Where a process's time goes, from py-spy's collapsed stacks (`side_by_side.py --py-spy DIR
--py-spy-format raw`): each sample is charged to the layer of its innermost frame, so the shares add
up to 100 % of the busy samples, and docs/PERFORMANCE.md can say "h2 is N % of the relay" from a
file anyone can regenerate.

    .venv/bin/python bench/profile_shares.py /tmp/prof/tunnel-c16-r1-relay.txt [...]

A sample is charged to the first layer (in the order below) that its innermost frame's file
belongs to; idle samples (the reactor waiting in epoll, pool threads waiting for work) are counted apart, not in the shares.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (layer, pattern on the frame's file): the first match wins, so narrower ones come first.
LAYERS: tuple[tuple[str, str], ...] = (
    # send() and recv() themselves: Twisted calls socket.send through untilConcludes (EINTR retry).
    ("sockets: send/recv system calls", r"^twisted/python/util\.py:untilConcludes$"),
    ("h2 / hpack / hyperframe / priority", r"^(h2|hpack|hyperframe|priority)/"),
    ("autobahn / txaio (WebSocket)", r"^(autobahn|txaio)/"),
    ("click (autobahn styles its debug-log arguments with it)", r"^click/"),
    ("twisted.web server (http.py, server.py)", r"^twisted/web/(http|server|resource|_newclient_server)\.py"),
    ("twisted.web client (Agent, _newclient)", r"^twisted/web/(client|_newclient|iweb|_responses)\.py"),
    ("twisted.web other", r"^twisted/web/"),
    ("sockets: recv, Twisted's buffers (tcp.py, abstract.py)", r"^twisted/internet/(tcp|abstract|_newtls)\.py"),
    ("reactor, Deferreds, timers", r"^twisted/internet/"),
    ("twisted.logger / python log", r"^twisted/(logger|python/log)"),
    ("twisted other", r"^twisted/"),
    ("treq", r"^treq/"),
    ("prometheus_client", r"^prometheus_client/"),
    ("mcpr.proxy", r"^mcpr/proxy/"),
    ("mcpr.gateway", r"^mcpr/gateway/"),
    ("mcpr.relay", r"^mcpr/relay/"),
    ("mcpr.common", r"^mcpr/common/"),
    ("json", r"^json/"),
    ("email (Content-Type parsing)", r"^email/"),
    ("stdlib other", r"^<frozen|^[a-z_]+\.py|^[a-z_]+/"),
)
# The reactor waiting in epoll, and the thread pool's threads waiting for work.
IDLE = re.compile(r"(EPollReactor\.doPoll \(twisted/internet/epollreactor\.py|Condition\.wait \(threading\.py"
                  r"|Thread\._wait_for_tstate_lock \(threading\.py):\d+\)$")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):\d+\)$")


def frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def layer_of(frame: str) -> str:
    m = FRAME.match(frame)
    where = m.group("file") if m else frame
    where = re.sub(r"^.*/site-packages/", "", where)
    where = re.sub(r"^.*/lib/python3\.\d+/", "", where)
    if m and m.group("func") == "untilConcludes":
        where += ":untilConcludes"
    for name, pattern in LAYERS:
        if re.search(pattern, where):
            return name
    return "other"


def shares(path: Path) -> tuple[Counter[str], int, int]:
    """Busy samples per layer, the busy total and the idle count."""
    by_layer: Counter[str] = Counter()
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        fs = frames(stack)
        if not fs or IDLE.search(fs[-1]):
            idle += n
            continue
        by_layer[layer_of(fs[-1])] += n
    return by_layer, sum(by_layer.values()), idle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="py-spy raw (collapsed) files")
    args = parser.parse_args()
    for path in args.files:
        by_layer, busy, idle = shares(path)
        if not busy:
            print(f"{path}: no busy samples", file=sys.stderr)
            continue
        print(f"{path.name}: {busy} busy samples ({busy / (busy + idle):.0%} of all)")
        for name, n in by_layer.most_common():
            print(f"  {n / busy:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
