"""Packaging and deployment: the Debian package, the systemd units, the Dockerfile.

The fast checks run in every `make test`: the files agree with each other and
with the code (versions, pins, command lines, config keys), and the units pass
`systemd-analyze verify` where systemd is installed.

Two slow checks are opt-in:

- `MCPR_TEST_DEB=1` (root, Debian 12 with dpkg-dev, debhelper, dh-virtualenv,
  python3-venv; needs PyPI): builds the .deb from the committed tree
  (`make deb`), unpacks it into a clean directory and checks its contents,
  installs it on this machine with apt, runs the relay with the unit's own
  command line as the unit's user (with the unit's capability), checks
  `/healthz` over HTTP and TLS, SIGHUP and SIGTERM, reinstalls it over a
  modified configuration, and purges it.  **It installs and purges the mcpr
  package on this machine.**
- `MCPR_TEST_DOCKERFILE=1` (root; needs PyPI): `scripts/check-dockerfile`,
  every Dockerfile step run by hand, then the image's entrypoint and health check.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mcpr.common.settings import cli_values
from mcpr.common.startup import EXIT_STATUS
from mcpr.relay.settings import RELAY_SETTINGS, load_relay
from mcpr.relay.tap import Options as RelayOptions
from tests.support.processes import ROOT

RELAY_UNIT = ROOT / "systemd" / "mcpr-relay.service"
RELAYS_UNIT = ROOT / "systemd" / "mcpr-relay@.service"  # N relays on one machine, one port
GATEWAY_UNIT = ROOT / "systemd" / "mcpr@.service"
UNITS = (RELAY_UNIT, RELAYS_UNIT, GATEWAY_UNIT)
CONFFILE = ROOT / "etc" / "mcpr" / "relay.toml"
VENV = "/opt/venvs/mcpr"
RELAY_COMMAND = f"{VENV}/bin/twist --log-format=text mcpr-relay --config /etc/mcpr/relay.toml"
RELAYS_COMMAND = (f"{RELAY_COMMAND} --node-url http://${{NODE_ADDRESS}}:700%i "
                  "--metrics tcp:910%i:interface=127.0.0.1")
GATEWAY_COMMAND = f"{VENV}/bin/twist --log-format=text mcpr --config /etc/mcpr/%i.toml"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file, sections merged; enough for these checks."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    if len(values) != 1:
        raise AssertionError(f"{key}: expected one value, got {values}")
    return values[0]


def relay_default(name: str):
    return next(s.default for s in RELAY_SETTINGS if s.name == name)


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", value)
    if not match:
        raise AssertionError(f"cannot read a time span from {value!r}")
    return int(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def setup_cfg_version() -> str:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uncommented_example(text: str) -> str:
    """The conffile with every commented `key = value` and `[[relay.tokens]]`
    line enabled; a key given twice in one table keeps its last example."""
    lines = text.splitlines()
    table = ""
    chosen: dict[tuple[str, str], int] = {}
    headers: list[int] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped
            continue
        if stripped == "# [[relay.tokens]]":
            headers.append(i)
            table = f"token {i}"
            continue
        match = re.match(r"# ([a-z_]+) = ", stripped)
        if match:
            chosen[(table, match.group(1))] = i
    enable = set(chosen.values()) | set(headers)
    return "\n".join(line.strip()[2:] if i in enable else line for i, line in enumerate(lines)) + "\n"


class _UncheckedRelayOptions(RelayOptions):
    """`twist mcpr-relay`'s options, parsed without loading the settings (the test does, with its
    own environment and config)."""

    def postOptions(self) -> None:
        pass


class ReleaseTests(SynchronousTestCase):
    """The release metadata agree: changelog, setup.cfg and the lock file."""

    def test_changelog_version_is_setup_cfg_version(self) -> None:
        top = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
        match = re.match(r"mcpr \(([^)]+)\) ", top)
        self.assertIsNotNone(match, top)
        self.assertEqual(match.group(1).split("-")[0], setup_cfg_version())

    def test_changelog_date_is_not_in_the_future(self) -> None:
        # SOURCE_DATE_EPOCH comes from it: a date ahead of the build would put
        # every file of the package in the future.
        trailer = next(line for line in (ROOT / "debian" / "changelog").read_text().splitlines()
                       if line.startswith(" -- "))
        when = parsedate_to_datetime(trailer.split(">", 1)[1].strip())
        self.assertLessEqual(when, datetime.datetime.now(datetime.timezone.utc))

    def test_lock_pins_satisfy_setup_cfg(self) -> None:
        pins: dict[str, str] = {}
        for line in (ROOT / "requirements.lock").read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, sep, version = line.partition("==")
            self.assertEqual(sep, "==", f"not an exact pin: {line}")
            key = canonicalize_name(name)
            self.assertNotIn(key, pins, f"pinned twice: {name}")
            pins[key] = version
        parser = configparser.ConfigParser()
        parser.read(ROOT / "setup.cfg")
        required = [Requirement(r) for r in parser["options"]["install_requires"].split("\n") if r.strip()]
        self.assertIn("cryptography", {r.name for r in required})
        for req in required:
            key = canonicalize_name(req.name)
            hint = "; refresh it: .venv/bin/python scripts/lock_requirements.py"
            self.assertIn(key, pins, f"{req.name} is required by setup.cfg but not in requirements.lock{hint}")
            self.assertTrue(req.specifier.contains(pins[key], prereleases=True),
                            f"requirements.lock pins {req.name}=={pins[key]}, setup.cfg wants {req}{hint}")
        # The extras' dependencies are pinned too (twisted[tls,http2]).
        for name in ("pyopenssl", "service-identity", "idna", "h2", "priority"):
            self.assertIn(name, pins)


class WheelTests(SynchronousTestCase):
    """`make wheel` builds a wheel that works on its own, away from the checkout."""

    def test_wheel_in_a_fresh_venv(self) -> None:
        """Installed into a new venv, whose only other path is this venv's site-packages (added by a
        .pth line, so the checkout's editable-install .pth there is not processed): the commands and
        the plugins come from the wheel."""
        if shutil.which("git") is None or not (ROOT / ".git").exists():
            raise SkipTest("`make wheel` builds from git HEAD: needs git and a clone")
        work = Path(tempfile.mkdtemp(prefix="mcpr-wheel-"))
        self.addCleanup(shutil.rmtree, work, True)
        bin_dir = Path(sys.executable).parent
        subprocess.run(["make", "-s", "-C", str(ROOT), "wheel", f"DIST={work / 'dist'}", f"BIN={bin_dir}"],
                       check=True, capture_output=True, timeout=300)
        [wheel] = (work / "dist").glob(f"mcpr-{setup_cfg_version()}-py3-none-any.whl")
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                        "--quiet", "--no-deps", "--no-compile", str(wheel)], check=True, capture_output=True,
                       timeout=300)
        [site] = venv.glob("lib/python3.*/site-packages")
        deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "twisted").is_dir())
        (site / "test-deps.pth").write_text(f"{deps}\n")

        def run(*args: str) -> str:
            result = subprocess.run(args, capture_output=True, text=True, cwd=work, timeout=120,
                                    env={"PATH": "/usr/bin:/bin", "HOME": str(work)})
            self.assertEqual(result.returncode, 0, result.stderr)
            return result.stdout

        self.assertEqual(run(str(venv / "bin" / "python"), "-c", "import mcpr; print(mcpr.__file__)").strip(),
                         str(site / "mcpr" / "__init__.py"))
        # `python -m twisted` is `twist`, whose script comes with Twisted (not installed here).
        self.assertIn("--mcp=", run(str(venv / "bin" / "python"), "-m", "twisted", "mcpr", "--help"))
        self.assertIn("--domain=", run(str(venv / "bin" / "python"), "-m", "twisted", "mcpr-relay", "--help"))
        self.assertEqual(run(str(venv / "bin" / "mcpr"), "--version").strip(), f"mcpr {setup_cfg_version()}")
        # The inspector's page is package data: from the wheel, every file it serves.
        served = run(str(venv / "bin" / "python"), "-c", "import json; from mcpr.gateway.inspector.web import "
                     "load_static; print(json.dumps(sorted((p.decode(), len(d)) for p, (d, _) in load_static().items())))")
        self.assertEqual([path for path, size in json.loads(served) if size > 0],
                         ["/", "/static/inspector.css", "/static/inspector.js"])


class ConffileTests(SynchronousTestCase):
    """The shipped /etc/mcpr/relay.toml: valid, and only examples beside `mode`."""

    def test_only_mode_is_set(self) -> None:
        self.assertEqual(tomllib.loads(CONFFILE.read_text()), {"mode": "relay", "relay": {}})

    def test_every_example_is_a_relay_setting(self) -> None:
        known = {s.path[-1] for s in RELAY_SETTINGS if s.path} | {"token", "subdomains"}
        seen = set()
        for line in CONFFILE.read_text().splitlines():
            match = re.match(r"# ([a-z_]+) = ", line.strip())
            if match:
                tomllib.loads(line.strip()[2:])        # each example is valid TOML on its own
                self.assertIn(match.group(1), known, line)
                seen.add(match.group(1))
        expected = {"port", "domain", "listen", "public_url", "auth_provider", "auth_provider_secret", "metrics",
                    "max_request_body", "max_in_flight", "max_tunnels_per_token", "max_message_size",
                    "registration_timeout", "headers_timeout", "drain_timeout", "ping_interval", "ping_timeout",
                    "max_tunnels", "max_tunnels_per_ip", "registration_rate", "registration_burst",
                    "reservation_grace", "max_reservations", "state_dir", "token", "subdomains"}
        self.assertEqual(expected - seen, set(), "settings without an example in relay.toml")

    def test_examples_together_make_a_valid_relay(self) -> None:
        path = Path(self.mktemp())
        path.write_text(uncommented_example(CONFFILE.read_text()))
        path.chmod(0o600)  # it holds tokens: the package keeps it 0640 root:mcpr, and a readable one is warned about
        settings = load_relay({}, config=str(path), env={})
        self.assertEqual(settings.domain, "tunnel.example.com")
        self.assertEqual(settings.listen, ("tls:/etc/mcpr/certs:port=443", "tcp:8080:interface=127.0.0.1"))
        self.assertEqual(settings.auth_mode, "static")
        self.assertEqual(len(settings.tokens), 2)
        self.assertEqual(settings.metrics, "tcp:9100:interface=127.0.0.1")
        # The only warning: static tokens win over the provider example.
        self.assertEqual([w for w in settings.warnings if "auth-provider" not in w], [])

    def test_drain_timeout_fits_in_the_stop_timeout(self) -> None:
        stop = seconds(one(unit_settings(RELAY_UNIT), "TimeoutStopSec"))
        self.assertEqual(relay_default("drain_timeout"), 30.0)
        example = re.search(r"# drain_timeout = (\d+)", CONFFILE.read_text())
        self.assertLess(float(example.group(1)), stop)
        self.assertIn(f"TimeoutStopSec ({int(stop)})", CONFFILE.read_text())


class UnitTests(SynchronousTestCase):
    """The systemd units: command lines, lifecycle, capabilities and hardening."""

    def test_relay_command_line(self) -> None:
        settings = unit_settings(RELAY_UNIT)
        self.assertEqual(one(settings, "ExecStart"), RELAY_COMMAND)
        self.assertEqual(one(settings, "Type"), "exec")

    def test_relay_lifecycle(self) -> None:
        for unit in (RELAY_UNIT, RELAYS_UNIT):
            settings = unit_settings(unit)
            self.assertEqual(one(settings, "ExecReload"), "/bin/kill -HUP $MAINPID", unit.name)
            self.assertEqual(one(settings, "KillSignal"), "SIGTERM", unit.name)
            self.assertGreater(seconds(one(settings, "TimeoutStopSec")), relay_default("drain_timeout") + 5, unit.name)
            self.assertEqual(one(settings, "Restart"), "on-failure", unit.name)

    def test_relays_template(self) -> None:
        """Instance N: the shared config and ports, its own node URL, metrics and state; the cluster
        settings from an environment file the relay's own user cannot read; never beside the
        single relay, which reads the same config."""
        settings = unit_settings(RELAYS_UNIT)
        self.assertEqual(one(settings, "ExecStart"), RELAYS_COMMAND)
        self.assertEqual(one(settings, "Type"), "exec")
        self.assertEqual(one(settings, "EnvironmentFile"), "/etc/mcpr/relay-cluster.env")
        self.assertEqual(one(settings, "Environment"), "NODE_ADDRESS=127.0.0.1")
        self.assertEqual(one(settings, "StateDirectory"), "mcpr/relay-%i")
        self.assertEqual(one(settings, "Conflicts"), RELAY_UNIT.name)

    def test_relays_template_makes_cluster_nodes(self) -> None:
        """The command line of instances 1 and 9, as systemd expands it, with the environment file
        the unit's comment describes and a relay.toml with its `listen` example: valid relay settings,
        a cluster node of its own (node URL, metrics) on the shared listeners."""
        text = RELAYS_UNIT.read_text()
        listen = re.search(r"^#   (listen = .*)$", text, re.MULTILINE).group(1)
        env_file = dict(re.findall(r"^#   ([A-Z_]+)=(\S+)", text, re.MULTILINE))
        self.assertEqual(set(env_file), {"MCPR_CLUSTER", "MCPR_CLUSTER_SECRET", "NODE_ADDRESS"})
        config = Path(self.mktemp())
        config.write_text(f'mode = "relay"\n[relay]\ndomain = "tunnel.example.com"\n{listen}\n')
        config.chmod(0o600)
        env = {"MCPR_CLUSTER": env_file["MCPR_CLUSTER"], "MCPR_CLUSTER_SECRET": "s" * 64}
        command = one(unit_settings(RELAYS_UNIT), "ExecStart")
        for instance, address in (("1", "127.0.0.1"), ("9", "10.0.0.5")):
            argv = shlex.split(command.replace("%i", instance).replace("${NODE_ADDRESS}", address))
            options = _UncheckedRelayOptions()
            options.parseOptions(argv[argv.index("mcpr-relay") + 1:])
            settings = load_relay(cli_values(RELAY_SETTINGS, options), config=str(config), env=env)
            self.assertEqual(settings.listen, ("tls:/etc/mcpr/certs:port=443:reuseport=yes",
                                               "reuseport:8080:interface=127.0.0.1"))
            self.assertEqual(settings.node_url, f"http://{address}:700{instance}")
            self.assertEqual(settings.metrics, f"tcp:910{instance}:interface=127.0.0.1")
            self.assertEqual(settings.cluster, env_file["MCPR_CLUSTER"])

    def test_relays_template_is_the_relay_unit_hardened_alike(self) -> None:
        """Every setting of mcpr-relay.service is in the template with the same values, but for
        what makes an instance one of several."""
        own = {"Description", "ExecStart", "StateDirectory", "After", "Conflicts", "Environment", "EnvironmentFile"}
        single, template = unit_settings(RELAY_UNIT), unit_settings(RELAYS_UNIT)
        for key, values in single.items():
            if key not in own:
                self.assertEqual(template.get(key), values, key)
        self.assertEqual(set(template) - set(single), {"Conflicts", "Environment", "EnvironmentFile"})

    def test_a_mistake_is_not_retried(self) -> None:
        """Both daemons end with `EXIT_STATUS` for a mistake in their settings: retrying cannot help,
        and `systemctl status` shows the last run's log only, which must be the run that says why."""
        for unit in UNITS:
            self.assertEqual(one(unit_settings(unit), "RestartPreventExitStatus"), str(EXIT_STATUS), unit)

    def test_relay_may_bind_443_and_nothing_more(self) -> None:
        for unit in (RELAY_UNIT, RELAYS_UNIT):
            settings = unit_settings(unit)
            self.assertEqual(one(settings, "AmbientCapabilities"), "CAP_NET_BIND_SERVICE", unit.name)
            self.assertEqual(one(settings, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE", unit.name)

    def test_gateway_command_line(self) -> None:
        settings = unit_settings(GATEWAY_UNIT)
        self.assertEqual(one(settings, "ExecStart"), GATEWAY_COMMAND)
        self.assertEqual(one(settings, "CapabilityBoundingSet"), "")

    def test_hardening(self) -> None:
        for unit in UNITS:
            settings = unit_settings(unit)
            for key, value in [("User", "mcpr"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                               ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                               ("ConfigurationDirectory", "mcpr"), ("UMask", "0077")]:
                self.assertEqual(one(settings, key), value, f"{unit.name}: {key}")
            self.assertTrue(one(settings, "StateDirectory").startswith("mcpr"), unit.name)
            # PrivateUsers=yes cancels CAP_NET_BIND_SERVICE on the host;
            # MemoryDenyWriteExecute=yes breaks pyOpenSSL's cffi callbacks.
            self.assertNotIn("yes", settings.get("PrivateUsers", []), unit.name)
            self.assertEqual(settings.get("MemoryDenyWriteExecute"), ["no"], unit.name)

    def test_units_install_where_debian_rules_puts_the_venv(self) -> None:
        rules = (ROOT / "debian" / "rules").read_text()
        self.assertIn("DH_VIRTUALENV_INSTALL_ROOT := /opt/venvs", rules)
        install = (ROOT / "debian" / "mcpr.install").read_text().split("\n")
        for source in ("systemd/mcpr-relay.service", "systemd/mcpr-relay@.service", "systemd/mcpr@.service",
                       "etc/mcpr/relay.toml"):
            self.assertTrue(any(line.startswith(source + " ") for line in install), source)
        for line in filter(None, install):
            self.assertTrue((ROOT / line.split()[0]).exists(), line)
        self.assertEqual((ROOT / "debian" / "mcpr.links").read_text().split(),
                         [f"{VENV.lstrip('/')}/bin/mcpr", "usr/bin/mcpr"])
        self.assertTrue(os.access(ROOT / "debian" / "rules", os.X_OK))

    def test_systemd_analyze_verify(self) -> None:
        """`systemd-analyze verify` on a scratch root holding the units, systemd's
        own units and stand-ins for the executables the units name."""
        analyze = shutil.which("systemd-analyze")
        system = Path("/lib/systemd/system")
        if analyze is None or not (system / "sysinit.target").exists():
            raise SkipTest("systemd-analyze and systemd's units are not installed")
        root = Path(tempfile.mkdtemp(prefix="mcpr-units-"))
        self.addCleanup(shutil.rmtree, root, True)
        shutil.copytree(system, root / "lib/systemd/system", symlinks=True,
                        ignore=shutil.ignore_patterns("mcpr*"))
        for unit in UNITS:
            shutil.copy(unit, root / "lib/systemd/system" / unit.name)
            for key in ("ExecStart", "ExecReload"):
                for command in unit_settings(unit).get(key, []):
                    program = root / shlex.split(command)[0].lstrip("/")
                    program.parent.mkdir(parents=True, exist_ok=True)
                    program.write_text("#!/bin/sh\n")
                    program.chmod(0o755)
        result = subprocess.run([analyze, "verify", f"--root={root}", "mcpr-relay.service", "mcpr-relay@1.service",
                                 "mcpr@example.service"], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


class DockerfileTests(SynchronousTestCase):
    """The Dockerfile: entrypoint, runtime user, copied files and the mounted config."""

    def setUp(self) -> None:
        self.text = (ROOT / "Dockerfile").read_text()

    def test_entrypoint_and_runtime(self) -> None:
        self.assertIn('ENTRYPOINT ["twist", "--log-format=text", "mcpr-relay"]', self.text)
        self.assertNotIn("--nodaemon", self.text)
        self.assertIn("EXPOSE 8080", self.text)
        self.assertRegex(self.text, r"\nENV .*MCPR_HEALTHCHECK_URL=http://127\.0\.0\.1:8080/healthz")
        self.assertRegex(self.text, r"\nHEALTHCHECK .*\\\n  CMD \[.*MCPR_HEALTHCHECK_URL")
        self.assertGreaterEqual(len(re.findall(r"^FROM ", self.text, re.MULTILINE)), 2)
        users = re.findall(r"^USER (\S+)", self.text, re.MULTILINE)
        self.assertTrue(users and users[-1].split(":")[0] not in ("root", "0"), users)

    def test_copied_files_exist_and_are_not_ignored(self) -> None:
        ignore = (ROOT / ".dockerignore").read_text().split()
        for match in re.finditer(r"^COPY (?!--from)(.*)$", self.text, re.MULTILINE):
            for source in match.group(1).split()[:-1]:
                self.assertTrue((ROOT / source).exists(), source)
                self.assertNotIn(source.rstrip("/"), ignore)

    def test_mounted_config_is_found_from_the_workdir(self) -> None:
        self.assertIn("ln -s /etc/mcpr/relay.toml /srv/mcpr/mcpr.toml", self.text)
        self.assertIn("WORKDIR /srv/mcpr", self.text)

    def test_check_dockerfile(self) -> None:
        if os.environ.get("MCPR_TEST_DOCKERFILE") != "1":
            raise SkipTest("set MCPR_TEST_DOCKERFILE=1 to run every Dockerfile step by hand (about a minute)")
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check-dockerfile")],
                                capture_output=True, text=True, timeout=900)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class DebianPackageTests(SynchronousTestCase):
    """Build, unpack, install, run, reinstall and purge the .deb (MCPR_TEST_DEB=1)."""

    def setUp(self) -> None:
        if os.environ.get("MCPR_TEST_DEB") != "1":
            raise SkipTest("set MCPR_TEST_DEB=1 to build and install the .deb (a few minutes; installs and "
                           "purges the mcpr package on this machine)")
        if os.geteuid() != 0:
            raise SkipTest("installing the .deb needs root")
        for tool in ("dpkg-buildpackage", "dh_virtualenv", "apt-get", "setpriv", "git"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed (apt-get install dpkg-dev debhelper dh-virtualenv)")

    def run_command(self, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
        if result.returncode != 0:
            self.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def test_deb(self) -> None:
        dist = ROOT / "dist"
        for old in dist.glob("mcpr_*"):
            old.unlink()
        self.run_command("make", "-C", str(ROOT), "deb", timeout=1800)
        [deb] = dist.glob(f"mcpr_{setup_cfg_version()}_*.deb")
        self.check_contents(deb)
        self.addCleanup(self.purge)
        self.install(deb)
        self.check_installed()
        config = Path("/etc/mcpr/relay.toml")
        http_port, tls_port = free_port(), self.free_privileged_port()
        config.write_text(f'mode = "relay"\n[relay]\ndomain = "tunnel.test"\ndrain_timeout = 3\n'
                          f'listen = ["tcp:{http_port}:interface=127.0.0.1", '
                          f'"tls:/etc/mcpr/certs:port={tls_port}:interface=127.0.0.1"]\n'
                          '[[relay.tokens]]\ntoken = "mcpr_test"\nsubdomains = ["t-*"]\n')
        self.write_certificate(Path("/etc/mcpr/certs/tunnel.test.pem"))
        self.run_relay(http_port, tls_port)
        # Reinstalling (dpkg's upgrade path) keeps the edited conffile and its mode.
        self.install(deb)
        self.assertIn("tunnel.test", config.read_text())
        self.assertEqual(oct(config.stat().st_mode & 0o777), "0o640")
        self.purge()
        self.assertFalse(Path(VENV).exists())
        self.assertFalse(config.exists())
        self.assertFalse(Path("/var/lib/mcpr").exists() or Path("/var/log/mcpr").exists())
        self.assertNotIn("/etc/mcpr/relay.toml", self.run_command("dpkg-statoverride", "--list").stdout)

    def check_contents(self, deb: Path) -> None:
        """Unpacked into a clean directory: files in place, plugin cache fresh, units valid."""
        root = Path(tempfile.mkdtemp(prefix="mcpr-deb-root-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.run_command("dpkg-deb", "-x", str(deb), str(root))
        for path in (f"{VENV}/bin/twist", f"{VENV}/bin/mcpr", "usr/bin/mcpr", "etc/mcpr/relay.toml",
                     "lib/systemd/system/mcpr-relay.service", "lib/systemd/system/mcpr-relay@.service",
                     "lib/systemd/system/mcpr@.service",
                     "usr/share/mcpr/certbot-deploy-hook", "usr/share/man/man1/mcpr.1.gz"):
            self.assertTrue((root / path.lstrip("/")).exists() or (root / path.lstrip("/")).is_symlink(), path)
        self.assertEqual((root / "etc/mcpr/relay.toml").read_bytes(), CONFFILE.read_bytes())
        plugins = next((root / VENV.lstrip("/")).glob("lib/python3.*/site-packages/twisted/plugins"))
        cache = (plugins / "dropin.cache").stat().st_mtime
        newest = max(p.stat().st_mtime for p in plugins.glob("*.py"))
        self.assertGreater(cache, newest, "dropin.cache would be rebuilt (and fail) at every start")
        self.assertTrue((plugins / "mcpr_plugins.py").exists())
        self.assertFalse(list((root / VENV.lstrip("/")).glob("lib/python3.*/site-packages/pip")))
        control = self.run_command("dpkg-deb", "-f", str(deb), "Depends").stdout
        self.assertIn("python3.11", control)

    def install(self, deb: Path) -> None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        self.run_command("apt-get", "install", "-y", "-q", "--allow-downgrades", "-o",
                         "Dpkg::Options::=--force-confold", str(deb), env=env, stdin=subprocess.DEVNULL)

    def purge(self) -> None:
        if subprocess.run(["dpkg", "-s", "mcpr"], capture_output=True).returncode == 0:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            self.run_command("apt-get", "purge", "-y", "-q", "mcpr", env=env, stdin=subprocess.DEVNULL)
        # What this test wrote and dpkg leaves behind (certs/ is not empty).
        Path("/etc/mcpr/certs/tunnel.test.pem").unlink(missing_ok=True)
        for folder in (Path("/etc/mcpr/certs"), Path("/etc/mcpr")):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def check_installed(self) -> None:
        self.run_command("getent", "passwd", "mcpr")
        # The state and log directories, before any unit ran (the units' StateDirectory=, LogsDirectory=).
        for folder in ("/var/lib/mcpr", "/var/log/mcpr"):
            self.assertEqual(self.run_command("stat", "-c", "%U:%G %a", folder).stdout.strip(), "mcpr:mcpr 750", folder)
        listing = self.run_command("dpkg-statoverride", "--list").stdout
        self.assertIn("root mcpr 640 /etc/mcpr/relay.toml", listing)
        self.assertIn("root mcpr 750 /etc/mcpr/certs", listing)
        version = self.run_command("/usr/bin/mcpr", "--relay", "--version", cwd="/").stdout
        self.assertEqual(version.strip(), f"mcpr {setup_cfg_version()}")
        if shutil.which("systemd-analyze") and Path("/lib/systemd/system/sysinit.target").exists():
            result = subprocess.run(["systemd-analyze", "verify", "/lib/systemd/system/mcpr-relay.service",
                                     "/lib/systemd/system/mcpr-relay@.service", "/lib/systemd/system/mcpr@.service"],
                                    capture_output=True, text=True)
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def free_privileged_port(self) -> int:
        for port in range(443, 1024):
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
        raise SkipTest("no free port below 1024")

    def write_certificate(self, path: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel.test")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("tunnel.test"), x509.DNSName("*.tunnel.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
                         + certificate.public_bytes(serialization.Encoding.PEM))
        shutil.chown(path, "root", "mcpr")
        path.chmod(0o640)

    def run_relay(self, http_port: int, tls_port: int) -> None:
        """The installed unit's ExecStart, as its User with its AmbientCapabilities, from /, with
        systemd's small environment and its StateDirectory; /healthz over HTTP and TLS, then SIGHUP,
        then SIGTERM."""
        unit = unit_settings(Path("/lib/systemd/system/mcpr-relay.service"))
        command = shlex.split(one(unit, "ExecStart"))
        self.assertEqual(" ".join(command), RELAY_COMMAND)
        user = one(unit, "User")
        caps = one(unit, "AmbientCapabilities").lower().replace("cap_", "+")
        wrapper = ["setpriv", f"--reuid={user}", f"--regid={one(unit, 'Group')}", "--init-groups",
                   f"--inh-caps={caps}", f"--ambient-caps={caps}", "--no-new-privs", "--"]
        # What systemd makes before ExecStart for StateDirectory=, and tells the service in $STATE_DIRECTORY.
        state = Path("/var/lib") / one(unit, "StateDirectory")
        state.mkdir(mode=int(one(unit, "StateDirectoryMode"), 8), exist_ok=True)
        shutil.chown(state, user, one(unit, "Group"))
        log = Path(tempfile.mkstemp(prefix="mcpr-relay-", suffix=".log")[1])
        self.addCleanup(log.unlink)
        with log.open("wb") as out:
            process = subprocess.Popen(wrapper + command, cwd="/", stdout=out, stderr=subprocess.STDOUT,
                                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                            "STATE_DIRECTORY": str(state)})
        try:
            health = self.wait_healthy(process, log, f"http://127.0.0.1:{http_port}/healthz")
            self.assertEqual((health["status"], health["domain"]), ("ok", "tunnel.test"))
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="tunnel.test") as tls:
                    names = tls.getpeercert(binary_form=True)
                    self.assertTrue(names)
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: tunnel.test\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
            self.assertIn(b'"status": "ok"', answer)
            process.send_signal(signal.SIGHUP)
            self.wait_for(log, "reloading (SIGHUP)")
            self.assertIsNone(process.poll(), "the relay died on SIGHUP")
            self.wait_healthy(process, log, f"http://127.0.0.1:{http_port}/healthz")
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        text = log.read_text()
        self.assertIn(process.returncode, (0, -signal.SIGTERM, 128 + signal.SIGTERM), text)
        self.assertIn("draining", text)
        self.assertNotIn("Unable to write to plugin cache", text)
        self.assertNotIn("reservations: cannot", text)
        self.assertTrue((state / "reservations.sqlite3").is_file(), "no reservations file in the StateDirectory")
        self.assertRegex(text.splitlines()[0], r"^\d{4}-\d\d-\d\dT")   # text, not JSON
        self.assertIn("auth mode: static", text)

    def wait_healthy(self, process: subprocess.Popen, log: Path, url: str) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail(f"the relay exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return json.load(response)
            except OSError:
                time.sleep(0.2)
        self.fail(f"no answer from {url}:\n{log.read_text()}")

    def wait_for(self, log: Path, text: str) -> None:
        deadline = time.monotonic() + 10
        while text not in log.read_text():
            if time.monotonic() > deadline:
                self.fail(f"{text!r} not logged:\n{log.read_text()}")
            time.sleep(0.1)
