"""Shared fixtures: the kvrail binary (KVRAIL_BIN, else the cargo build's),
stubs regenerated from proto/ for every run, and real agents on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvrail_vllm import _build
from kvrail_vllm.agentproc import NO_BINARY, AgentProcess, kvrail_binary

REPO = Path(__file__).resolve().parents[2]

# The tests always run against the protocol of this checkout.
_build.generate()


class Agent(AgentProcess):
    """A kvrail agent process started by a test (with the tests' cluster
    secret)."""

    def __init__(self, args: list[str], log: Path):
        binary = kvrail_binary(REPO)
        if binary is None:
            pytest.skip(NO_BINARY)
        env = dict(os.environ, KVRAIL_CLUSTER_SECRET="python-tests-cluster-secret-0123456789")
        super().__init__([str(binary), *args], log, env)


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
