"""The benchmark harness still runs: `bench/side_by_side.py --quick` on the mcpr paths, no peers needed.

A smoke check of the measuring instrument, not a measurement: it asserts that
every phase ran and produced figures of the right shape, never how fast
anything was (speed is measured by `make bench`, side by side, never by a
test).  It needs wrk (apt-get install wrk) and uses nginx as the upstream when
it is installed, bench/_roles.py's asyncio origin otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "side_by_side.py"


class QuickBenchTests(SynchronousTestCase):
    def test_quick_session_on_the_mcpr_paths(self) -> None:
        if shutil.which("wrk") is None:
            raise SkipTest("wrk is not installed (apt-get install wrk, or make bench-peers): "
                           "the benchmark's smoke test needs it")
        # 40 at once stays under Twisted's listen backlog (50): no SYN retries, which would cost seconds.
        cmd = [sys.executable, str(SCRIPT), "--quick", "--paths", "direct,gateway,tunnel", "--concurrency", "16",
               "--burst", "40", "--idle", "40", "--json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        data = json.loads(done.stdout)
        summary = data["summary"]

        for path in ("direct", "gateway", "tunnel"):
            cell = summary["small"][f"{path}@16"]
            self.assertGreater(cell["rps"], 0, path)
            self.assertEqual(cell["errors"], 0, f"wrk errors via {path}: {data['runs']['small']}")
            self.assertGreater(summary["sse"][path]["events"], 0, path)
            self.assertFalse(summary["sse"][path]["errors"], path)
            for op in ("down", "up"):
                self.assertFalse(summary["bulk"][f"{op}:{path}"]["errors"], (op, path))
                self.assertGreater(summary["bulk"][f"{op}:{path}"]["mbps"], 0, (op, path))
            self.assertEqual(summary["burst"][path]["requests"], 40, path)
        # CPU is charged to each process of a path, and relay + gateway to the tunnel.
        tunnel = summary["small"]["tunnel@16"]
        self.assertGreater(tunnel["cpu_us_per_request"]["relay"], 0)
        self.assertGreater(tunnel["cpu_us_per_request"]["gateway"], 0)
        self.assertEqual(set(summary["bulk"]["down:tunnel"]["rss_growth_mib"]), {"relay", "gateway"})
        self.assertEqual(data["idle"]["registered"], data["idle"]["requested"], data["idle"])
        self.assertIsNotNone(data["idle"]["relay_cpu_ms_per_registration"])
        # The peers were not asked for: their floors are n/a, the others have a verdict.
        verdicts = {f["floor"]: f["ok"] for f in data["floors"]}
        self.assertIsNone(verdicts["tunnel req/s c16 vs localtunnel"])
        self.assertIsNotNone(verdicts["tunnel SSE added p99"])
        self.assertIn("Floors (issue 11)", done.stderr)
        # Every row of the figures table has a value for each path measured.
        for row in data["figures"]:
            if row["figure"].startswith(("req/s", "p50", "bulk down MB/s")):
                self.assertIsNotNone(row["values"]["tunnel"], row)


class StoreCostBenchTests(SynchronousTestCase):
    def test_quick_run(self) -> None:
        """bench/store_cost.py --quick (about 6 s): both gateways measured, every request stored."""
        if shutil.which("wrk") is None:
            raise SkipTest("wrk is not installed (apt-get install wrk, or make bench-peers): "
                           "the store's benchmark needs it")
        cmd = [sys.executable, str(ROOT / "bench" / "store_cost.py"), "--quick", "--json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        data = json.loads(done.stdout)
        cell = data["summary"]["c16"]
        for mode in ("store", "no-store"):
            self.assertGreater(cell[mode]["rps"], 0, mode)
            self.assertGreater(cell[mode]["cpu_us_per_request"], 0, mode)
            self.assertEqual(cell[mode]["errors"], 0, mode)
        self.assertIsNotNone(cell["cpu_ratio_by_round"]["median"])
        stored = data["stored"]
        self.assertEqual(stored["dropped"], 0)
        self.assertGreaterEqual(stored["requests"], data["completed_by_store_gateway"],
                                "every request the store's gateway answered is in its store")
        self.assertIn("target: the store under 10 %", done.stderr)


class InstructionsBenchTests(SynchronousTestCase):
    def test_small_run(self) -> None:
        """bench/instructions.py on 30 requests (about 20 s): the gateway under callgrind gives a count."""
        if shutil.which("valgrind") is None:
            raise SkipTest("valgrind is not installed (apt-get install valgrind): the count needs callgrind")
        cmd = [sys.executable, str(ROOT / "bench" / "instructions.py"), "--requests", "30", "--warmup", "10",
               "--connections", "2", "--json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        (result,) = json.loads(done.stdout)["results"]
        self.assertEqual(result["requests"], 30)
        self.assertGreater(result["instructions_per_request"], 10_000)  # a proxied request is no less

    def test_registrations(self) -> None:
        """--target registration on 20 tunnels (about 30 s): the relay under callgrind gives a count."""
        if shutil.which("valgrind") is None:
            raise SkipTest("valgrind is not installed (apt-get install valgrind): the count needs callgrind")
        cmd = [sys.executable, str(ROOT / "bench" / "instructions.py"), "--target", "registration", "--requests", "20",
               "--warmup", "5", "--connections", "5", "--json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        (result,) = json.loads(done.stdout)["results"]
        self.assertEqual((result["name"], result["requests"]), ("relay", 20))
        self.assertGreater(result["instructions_per_request"], 100_000)  # an upgrade, a hello, an answer at least


class ClusterBenchTests(SynchronousTestCase):
    def test_quick_run(self) -> None:
        """bench/cluster.py --quick on 2 nodes and 2 tunnels (about 30 s): both phases measured, the
        hop's requests to B all forwarded and none of A's, a scale cell for each k."""
        for tool in ("wrk", "redis-server"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} is not installed (apt-get install wrk redis-server): the cluster's benchmark "
                               "needs it")
        cmd = [sys.executable, str(ROOT / "bench" / "cluster.py"), "--quick", "--rounds", "1", "--concurrency", "16",
               "--nodes", "1,2", "--tunnels", "2", "--scale-concurrency", "8", "--json"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(done.returncode, 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        data = json.loads(done.stdout)
        hop = data["hop"]["c16"]
        for target in ("owner", "forwarded"):
            self.assertGreater(hop[target]["rps"], 0, target)
            self.assertEqual(hop[target]["errors"], 0, target)
            for process in ("relay-a", "relay-b", "gateways"):
                self.assertIsNotNone(hop[target]["cpu_us_per_request"][process], (target, process))
        self.assertEqual(hop["owner"]["forwarded_share"], 0)
        self.assertGreaterEqual(hop["forwarded"]["forwarded_share"], 0.99)
        self.assertIsNotNone(hop["ratio"]["rps"])
        scale = data["scale"]
        self.assertEqual(set(scale), {"k1", "k2"})
        for k, cell in scale.items():
            self.assertGreater(cell["rps"], 0, k)
            self.assertEqual(cell["errors"], 0, k)
            self.assertEqual([sum(p) for p in cell["tunnels_per_node"]], [2], k)
        self.assertEqual(scale["k1"]["forwarded_share"], 0)
        self.assertEqual(scale["k1"]["ratio"]["rps"], 1.0)
        self.assertIsNotNone(scale["k2"]["ratio"]["relays_cpu_us_per_request"])
        self.assertIn("Scale: k relay processes on one public port", done.stderr)
