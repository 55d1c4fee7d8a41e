"""`make demo` (examples/demo.py --once): the round trip, the rewritten widget CSP, the gateway's lines
and events, as a newcomer sees them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.processes import ROOT, free_port


class DemoTests(SynchronousTestCase):
    def test_demo_once(self) -> None:
        workdir = Path(self.mktemp()).resolve()
        relay_port = free_port()
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "demo.py"), "--once", "--workdir", str(workdir),
             "--port", str(free_port()), "--relay-port", str(relay_port)],
            capture_output=True, text=True, timeout=120)
        out = result.stdout
        self.assertEqual(result.returncode, 0, out + result.stderr)
        public = f"http://demo.localhost:{relay_port}"
        self.assertIn(f"Tunnel: {public}", out)
        self.assertIn("  ok (full session in", out)
        # The CSP the server declares for localhost, and what a client of the public URL gets.
        self.assertIn("connect_domains   server: http://localhost:9000, https://api.open-meteo.com", out)
        self.assertIn(f"client: {public}, https://api.open-meteo.com", out)
        self.assertIn(f"client: {public}, https://fonts.gstatic.com", out)
        self.assertIn(f"openai/widgetDomain      {public}", out)
        self.assertRegex(out, r"\n  \d\d:\d\d:\d\d POST 200 \S+ .* resources/read ui://widget/greeting\.html\n")
        event = json.loads(re.search(r"JSON events \(.*\):\n  (\{.*\})\n", out).group(1))
        self.assertEqual((event["type"], event["via"], event["mcp_method"], event["resource"]),
                         ("request", "tunnel", "resources/read", "ui://widget/greeting.html"))
        # The demo's files stay in its work directory; the token is kept beside [csp] domain.
        config = (workdir / "mcpr.toml").read_text()
        self.assertIn(f'domain = "{public}"', config)
        self.assertRegex(config, r'token = "mcpr_[0-9a-f]{64}"')
        self.assertTrue((workdir / "relay-state").is_dir())
