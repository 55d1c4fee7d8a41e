"""SIGHUP: reread `[csp]` and apply it to the next requests.

The CSP policy is looked up per request, so it can change under a running
gateway.  Every other setting shaped something built once at start (listeners,
the tunnel, the connection pool), so a change to one of them is reported as
needing a restart instead of being half applied.  `twist` itself leaves
SIGHUP at its default action, which kills the process: this service installs
its own handler while it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from mcpr.common.service import SighupService
from mcpr.common.settings import ConfigError
from mcpr.gateway.settings import GatewaySettings
from mcpr.proxy.resource import ProxyResource

log = Logger()

# Applied by a reload; every other field needs a restart.
RELOADED = frozenset({"csp_mode", "csp_domains", "csp_domain", "csp_widgets"})
_NOT_SETTINGS = frozenset({"config_path", "warnings", "sources"})


def changed_keys(running: GatewaySettings, new: GatewaySettings) -> list[str]:
    """The settings that differ and that a reload cannot apply."""
    if running.tunnel_token is None:
        # The token the gateway generated and saved itself is not a change.
        running = dataclasses.replace(running, tunnel_token=new.tunnel_token)
    return [
        f.name for f in dataclasses.fields(GatewaySettings)
        if f.name not in RELOADED | _NOT_SETTINGS and getattr(running, f.name) != getattr(new, f.name)
    ]


class ReloadService(SighupService):
    """Applies `[csp]` from a fresh read of the settings on SIGHUP."""

    def __init__(self, reactor: IReactorFromThreads, resource: ProxyResource, running: GatewaySettings,
                 read: Callable[[], GatewaySettings]) -> None:
        super().__init__(reactor, self.reload)
        self._resource = resource
        self._running = running
        self._read = read

    def reload(self) -> None:
        try:
            new = self._read()
        except ConfigError as e:
            log.error("reload: {error}; the running settings stay", error=str(e))
            return
        for warning in new.warnings:
            log.warn("{warning}", warning=warning)
        self._resource.csp = new.csp
        log.info("reload: [csp] applied: mode {mode}, domains {domains}, domain {domain}, {rules} widget rule(s)",
                 mode=new.csp_mode, domains=list(new.csp_domains), domain=new.csp_domain,
                 rules=len(new.csp_widgets))
        restart = changed_keys(self._running, new)
        if restart:
            log.warn("reload: changed setting(s) {keys} need a restart to apply", keys=", ".join(restart))
