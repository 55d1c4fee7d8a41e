"""A newcomer's `make demo`: the prerequisites named in one line, a half-made venv made again.

The fast checks run `make` for real on a copy of the Makefile and its prerequisite script, with
`make -n` where a real venv would be built.  `MCPR_TEST_FRESH=1` (root; debootstrap,
systemd-container, Debian's mirror and PyPI; a few minutes) runs `scripts/check-fresh-clone`: a
clean clone of HEAD and `make demo` in a fresh Debian 12 container, without python3-venv, then
with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parents[2]


class MakefileVenvTests(SynchronousTestCase):
    """`make venv` on a copy of the checkout's Makefile: what it says, and when it makes the venv again."""

    def setUp(self) -> None:
        if shutil.which("make") is None:
            raise SkipTest("make is not installed")
        self.dir = Path(self.mktemp()).resolve()
        (self.dir / "scripts").mkdir(parents=True)
        for name in ("Makefile", "setup.cfg", "pyproject.toml", "scripts/check-prerequisites"):
            shutil.copy2(ROOT / name, self.dir / name)

    def make(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-C", str(self.dir), "--no-print-directory", *args], capture_output=True,
                              text=True, timeout=60)

    def test_no_python_is_one_line(self) -> None:
        result = self.make("venv", "PYTHON=/nonexistent/python3")
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stdout + result.stderr, r"^Makefile:\d+: \*\*\* no /nonexistent/python3 \(Python 3\.11 or "
                         r"newer\) on PATH; on Debian or Ubuntu: apt-get install python3\.  Stop\.\n$")
        self.assertFalse((self.dir / ".venv").exists())

    def test_python_without_ensurepip_is_one_line(self) -> None:
        """Debian's python3 without python3-venv: `import ensurepip` fails."""
        blocked = self.dir / "no-ensurepip"
        blocked.mkdir()
        (blocked / "ensurepip.py").write_text("raise ImportError('python3-venv is not installed')\n")
        python = self.dir / "python3"
        python.write_text(f"#!/bin/sh\nPYTHONPATH={blocked} exec {sys.executable} \"$@\"\n")
        python.chmod(0o755)
        result = self.make("demo", f"PYTHON={python}")
        self.assertEqual(result.returncode, 2)
        lines = (result.stdout + result.stderr).splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("cannot make a venv with pip (no ensurepip); on Debian or Ubuntu: apt-get install python3-venv",
                      lines[0])

    def test_a_half_made_venv_is_made_again(self) -> None:
        """`python3 -m venv` without python3-venv leaves .venv/bin/python and no pip."""
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.dir / ".venv")], check=True)
        plan = self.make("-n", "venv").stdout.splitlines()
        self.assertIn("rm -rf .venv", plan)
        self.assertIn("python3 -m venv .venv", plan)

    def test_a_working_venv_is_kept(self) -> None:
        if not (Path(sys.prefix) / ".installed-test").exists():
            raise SkipTest(f"the suite's venv ({sys.prefix}) was not made by make")
        (self.dir / ".venv").symlink_to(Path(sys.prefix))
        plan = self.make("-n", "venv").stdout
        self.assertNotIn("rm -rf", plan)
        self.assertNotIn("-m venv", plan)


class FreshCloneTests(SynchronousTestCase):
    """`scripts/check-fresh-clone` in a fresh Debian 12 container (MCPR_TEST_FRESH=1)."""

    def test_check_fresh_clone(self) -> None:
        if os.environ.get("MCPR_TEST_FRESH") != "1":
            raise SkipTest("set MCPR_TEST_FRESH=1 to run make demo on a clean clone in a fresh Debian 12 container "
                           "(root, debootstrap, systemd-container; a few minutes)")
        if os.geteuid() != 0:
            raise SkipTest("systemd-nspawn needs root")
        for tool in ("debootstrap", "systemd-nspawn", "git"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed (apt-get install debootstrap systemd-container git)")
        result = subprocess.run([str(ROOT / "scripts" / "check-fresh-clone")], capture_output=True, text=True,
                                timeout=1800)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("check-fresh-clone: all checks passed", result.stdout)
