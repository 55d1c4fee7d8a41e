"""The `twist mcpr` and `twist mcpr-relay` commands, and the relay's `sni:` and `reuseport:`
endpoint strings.

Nothing but pointers: the ServiceMaker imports the tap module lazily, and the
endpoint parsers import `mcpr.relay.tls` or `mcpr.relay.reuseport` only when a
description uses them, so a broken import never hides the commands from `twist --help`.
"""

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

mcprGateway = ServiceMaker(
    "mcpr",
    "mcpr.gateway.tap",
    "MCP-aware proxy in front of an MCP server, with an optional tunnel to a relay.",
    "mcpr",
)

mcprRelay = ServiceMaker(
    "mcpr relay",
    "mcpr.relay.tap",
    "Public relay that serves mcpr tunnels at https://<name>.<domain>.",
    "mcpr-relay",
)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _SNIDirectoryParser:
    """`sni:<directory>[:<port>][:interface=][:backlog=]`: TLS with SNI over a PEM directory.

    Not `tls:`, which is Twisted's own built-in parser and wins over plugins."""

    prefix = "sni"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from mcpr.relay.tls import sni_endpoint

        return sni_endpoint(reactor, *args, **kwargs)


mcprSNI = _SNIDirectoryParser()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _ReusePortParser:
    """`reuseport:<port>[:interface=][:backlog=]`: TCP with SO_REUSEPORT, several relay processes on one port."""

    prefix = "reuseport"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from mcpr.relay.reuseport import reuseport_endpoint

        return reuseport_endpoint(reactor, *args, **kwargs)


mcprReusePort = _ReusePortParser()
