"""The commands in this example's README exist as written: every `kvrail`
flag is one the real binary's subcommand takes (its `--help`; KVRAIL_BIN, as
the Python package's tests take it), every proxy flag one proxy.py takes, and
every `--kv-transfer-config` the top-level README's, for its role and socket."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))
from kvrail_vllm.agentproc import NO_BINARY, kvrail_binary  # noqa: E402
README = (HERE / "README.md").read_text()


def commands() -> list[list[str]]:
    """Every command line of the README's sh blocks and inline code, split
    as the shell would (comments and a trailing & dropped, leading VAR=value
    assignments skipped)."""
    lines = [ln for block in re.findall(r"```sh\n(.*?)```", README, re.S) for ln in block.splitlines()]
    lines += re.findall(r"`((?:kvrail|python3) [^`]+)`", README)
    out = []
    for line in lines:
        for part in re.split(r" && ", line):
            words = [w for w in shlex.split(part, comments=True) if w != "&"]
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words.pop(0)
            if words:
                out.append(words)
    return out


def kvrail_bin() -> Path:
    found = kvrail_binary(REPO)
    if found is None:
        pytest.skip(NO_BINARY)
    return found


def long_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))


def test_every_kvrail_flag_in_the_readme_is_the_binarys():
    runs = [c for c in commands() if c[0] == "kvrail"]
    assert sum(c[1] == "prefill" for c in runs) == 2 and sum(c[1] == "decode" for c in runs) == 2, runs
    helps: dict[str, set[str]] = {}
    for c in runs:
        sub = c[1]
        if sub not in helps:
            out = subprocess.run([str(kvrail_bin()), sub, "--help"], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, f"kvrail {sub} --help: {out.stderr}"
            helps[sub] = long_flags(out.stdout)
        for w in c[2:]:
            if w.startswith("--"):
                assert w.split("=", 1)[0] in helps[sub], f"kvrail {sub} takes no {w} (README: {' '.join(c)})"


def test_every_proxy_flag_in_the_readme_is_the_proxys():
    runs = [c for c in commands() if c[:2] == ["python3", "examples/vllm-disagg/proxy.py"]]
    assert len(runs) >= 2
    out = subprocess.run([sys.executable, str(HERE / "proxy.py"), "--help"], capture_output=True, text=True, timeout=30)
    known = long_flags(out.stdout)
    for c in runs:
        for w in c[2:]:
            if w.startswith("--"):
                assert w in known, f"proxy.py takes no {w}"


def test_every_kv_transfer_config_is_the_connectors():
    top = (REPO / "README.md").read_text()
    [base] = [json.loads(m) for m in re.findall(r"--kv-transfer-config '(\{.*?\})'", top[top.index("## Deploying") :])]
    serves = [c for c in commands() if c[:2] == ["vllm", "serve"]]
    assert len(serves) == 6
    for c in serves:
        cfg = json.loads(c[c.index("--kv-transfer-config") + 1])
        assert cfg["kv_role"] in ("kv_producer", "kv_consumer")
        socket = cfg["kv_connector_extra_config"]["socket"]
        assert cfg == dict(base, kv_role=cfg["kv_role"], kv_connector_extra_config={"socket": socket})
        # Each engine's socket is the --local-socket of an agent of its role.
        role = "prefill" if cfg["kv_role"] == "kv_producer" else "decode"
        agents = [a for a in commands() if a[:2] == ["kvrail", role]]
        assert socket.replace("{rank}", "0") in [a[a.index("--local-socket") + 1] for a in agents]
