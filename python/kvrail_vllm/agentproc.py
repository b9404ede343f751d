"""A kvrail agent (or another program that prints JSON event lines, such as
etcd's stand-ins in the tests) run as a child process: its events read from
stdout, its log (stderr) kept in a file for failure messages, stopped with
SIGTERM. Used by the benchmark and the tests; importing it starts nothing."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path


NO_BINARY = "no kvrail binary: run cargo build -p kvrail-agent or set KVRAIL_BIN (scripts/test does)"


class AgentExited(RuntimeError):
    """The process ended (or never printed the event waited for)."""


def kvrail_binary(repo: Path) -> Path | None:
    """The kvrail binary to run: KVRAIL_BIN if set (it must exist), else the
    cargo build's (CARGO_TARGET_DIR, else the checkout's target/), else None."""
    explicit = os.environ.get("KVRAIL_BIN")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"KVRAIL_BIN={explicit} does not exist: build it with cargo build -p kvrail-agent")
        return Path(explicit)
    found = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target")) / "debug" / "kvrail"
    return found if found.is_file() else None


class AgentProcess:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, env=env)

    def name(self) -> str:
        """`kvrail decode`, `etcd`: what a message calls it."""
        program = Path(self.argv[0]).name
        return f"{program} {self.argv[1]}" if program == "kvrail" and len(self.argv) > 1 else program

    def event(self, name: str, timeout_s: float = 60.0) -> dict:
        """The next JSON line on stdout whose "event" is `name`; other lines
        (UCX may log to stdout) are skipped."""
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
                if isinstance(v, dict) and v.get("event") == name:
                    return v
            elif self.proc.poll() is not None:
                break
        raise AgentExited(f"{self.name()} printed no {name!r} event (exit {self.proc.poll()}); its log ends:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AgentExited(f"{self.name()} exited ({self.proc.returncode}); its log ends:\n{self.log_tail()}")

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
        self.proc.stdout.close()
        self._log.close()
