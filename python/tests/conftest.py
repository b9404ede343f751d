"""Shared fixtures: the kvrail binary (KVRAIL_BIN, else the cargo build's),
stubs regenerated from proto/ for every run, and real agents on loopback."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvrail_vllm import _build

REPO = Path(__file__).resolve().parents[2]

# The tests always run against the protocol of this checkout.
_build.generate()


def kvrail_bin() -> Path | None:
    explicit = os.environ.get("KVRAIL_BIN")
    if explicit:
        if not Path(explicit).is_file():
            pytest.fail(f"KVRAIL_BIN={explicit} does not exist: build it with cargo build -p kvrail-agent")
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    found = target / "debug" / "kvrail"
    return found if found.is_file() else None


class Agent:
    """A kvrail agent process started by a test; its JSON event lines are read
    from stdout, its log kept for failure messages."""

    def __init__(self, args: list[str], log: Path):
        binary = kvrail_bin()
        if binary is None:
            pytest.skip("no kvrail binary: run cargo build -p kvrail-agent or set KVRAIL_BIN (scripts/test does)")
        env = dict(os.environ, KVRAIL_CLUSTER_SECRET="python-tests-cluster-secret-0123456789")
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=self._log, env=env)

    def event(self, name: str, timeout_s: float = 60.0) -> dict:
        """The next JSON line on stdout whose "event" is `name`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                if v.get("event") == name:
                    return v
            elif self.proc.poll() is not None:
                break
        raise AssertionError(f"agent printed no {name!r} event (exit {self.proc.poll()}); its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(*args: str, name: str) -> Agent:
        a = Agent(list(args), tmp_path / f"{name}.log")
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()
