"""A stranger's registration flood, run as its own process so that the test's reactor only measures
the bystander: `python registration_flood.py PORT COUNT [--concurrency N] [--source ADDRESS]`.

Each attempt is a legacy-protocol registration with a token and a name of its own.  Successful ones
stay open until the end (so they count against the relay's caps); at the end it prints one JSON line,
`{"registered": n, "refused": {"<code> <reason>": n, ...}}`, and exits, closing them all.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint


class _Attempt(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.sendMessage(json.dumps({"token": f"flood-{self.factory.n}", "subdomain": f"flood-{self.factory.n}"})
                         .encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if b'"url"' in payload and not self.factory.done.called:
            self.factory.done.callback(("registered", self))

    def onClose(self, wasClean: bool, code, reason) -> None:
        if not self.factory.done.called:
            self.factory.done.callback((f"{code} {reason}", None))


async def attempt(reactor, port: int, n: int, source: str) -> tuple[str, object]:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/_tunnel/register", reactor=reactor)
    factory.protocol = _Attempt
    factory.n = n
    factory.done = defer.Deferred()
    try:
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)).connect(factory)
    except Exception as e:
        return f"connect failed: {e}", None
    return await factory.done


async def main(reactor, port: int, count: int, concurrency: int, source: str) -> None:
    outcomes: Counter = Counter()
    kept = []
    semaphore = defer.DeferredSemaphore(concurrency)

    async def one(n: int) -> None:
        outcome, proto = await semaphore.run(lambda: defer.Deferred.fromCoroutine(attempt(reactor, port, n, source)))
        outcomes[outcome] += 1
        if proto is not None:
            kept.append(proto)

    await defer.gatherResults([defer.Deferred.fromCoroutine(one(n)) for n in range(count)])
    registered = outcomes.pop("registered", 0)
    print(json.dumps({"registered": registered, "refused": dict(outcomes)}), flush=True)
    for proto in kept:
        proto.transport.abortConnection()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--source", default="127.0.0.1")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args.port, args.count, args.concurrency,
                                                                 args.source)))
