"""The `twist mcpr` and `twist mcpr-relay` commands.

Nothing but pointers: the ServiceMaker imports the tap module lazily, so a
broken import never hides the command from `twist --help`.
"""

from twisted.application.service import ServiceMaker

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
