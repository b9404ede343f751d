"""A smoke test of the connector path benchmark (kvrail_vllm.bench): one tiny
point with four real agents; it checks the report's shape and that bytes were
moved and verified on both paths, never a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

from kvrail_vllm.agentproc import NO_BINARY, kvrail_binary

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    binary = kvrail_binary(REPO)
    if binary is None:
        pytest.skip(NO_BINARY)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT))
    cmd = [sys.executable, "-m", "kvrail_vllm.bench", "--kvrail", str(binary), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("direct", ["mmap", "engine"])
def test_one_tiny_point_reports_both_paths_with_verified_bytes(direct):
    args = ["--transport", "tcp", "--blocks", "2", "--block-bytes", "16KiB", "--passes", "2", "--requests", "2", "--direct-region", direct]
    out = run_bench("--json", *args)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    p = json.loads(line)
    assert (p["transport"], p["blocks"], p["block_bytes"], p["request_bytes"]) == ("tcp", 2, 16384, 32768)
    assert p["passes"] == 2 and p["requests_per_pass"] == 2 and p["direct_region"] == direct
    for side in ("sidecar", "direct"):
        s = p[side]
        assert s["samples"] == 4 and len(s["latency_ms"]) == 4
        assert 0 < s["p50_ms"] <= s["p99_ms"] and s["gbps"] > 0 and s["engine_cpu_us"] > 0
        # The warm-up and the closing pass are verified: 2 requests of 2 blocks each.
        assert p["verified_blocks"][side] == 8
    extra = p["sidecar"]["extra"]
    assert extra["get_finished_calls"] >= extra["poll_rpcs"] >= 1 and extra["start_load_kv_cpu_us"] > 0 and extra["start_load_kv_p50_ms"] > 0
    assert p["poll_backoff"] == 0.05 and p["step_us"] == 100 and p["grpcio"]
    assert p["ratio"] > 0 and p["goal_ratio_met"] is None and isinstance(p["goal_cpu_met"], bool)
    assert Path(p["binary"]).is_file()


def test_bad_arguments_get_one_line():
    out = run_bench("--block-bytes", "1000")
    assert out.returncode == 2 and "a whole number of 4 KiB pages" in out.stderr
