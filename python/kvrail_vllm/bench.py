"""The connector path benchmark (issue 23, Performance): kvrail's vLLM connector
end to end against the same transfer through the agent's Control API.

    python3 -m kvrail_vllm.bench [--json] [--transport sm,tcp] [--blocks 1,16,256]
        [--block-bytes 16KiB,256KiB,2MiB] [--passes 8] [--step-us 100] [--poll-backoff 0.05]
        [--direct-region mmap|ucx|engine] [--kvrail PATH]

For every transport and block size it starts two pairs of real agents on
loopback and keeps both alive side by side:

- **sidecar**: a prefill and a decode agent started with
  ``--region-from-client``; this process plays both engines. It creates each
  engine's KV cache as a memfd, maps it, and attaches it through the Sidecar
  API (``KvrailWorker.attach_host``, what the connector's
  ``register_kv_caches`` does). A request runs vLLM's call order with the
  connector's real code: the prefill scheduler's ``request_finished`` and its
  worker's step (Publish), the decode scheduler's ``get_num_new_matched_tokens``,
  ``update_state_after_alloc`` and ``build_connector_meta``, then the decode
  worker's ``start_load_kv`` (``KvrailWorker.run_step``: Pull) and its
  ``get_finished`` (``KvrailWorker.results``: a Poll, under the worker's
  backoff) once per engine step (``--step-us``) until the request is in
  ``finished_recving``. Timed: ``start_load_kv`` to that ``get_finished``.
- **direct**: a prefill and a decode agent with regions of their own, the same
  geometry and kind of memory (application memory: ``--mmap-region``), and one
  ``Control.Transfer`` (a read, as a pull is) on the decode agent's local
  socket moving the same blocks. Timed: the call. (``--direct-region ucx``:
  UCX-allocated regions; ``engine``: the sidecar path's own agents.)

The two sides take turns pass by pass (sidecar, direct, direct, sidecar, ...),
after one untimed warm-up pass each (it dials the session); a closing pass of
each is untimed too. Both are verified: on the sidecar side the prefill memfd
holds a per-block pattern written here and the decode memfd's destination blocks
are poisoned before and compared after; on the direct side the agents'
FillPattern / PoisonBlocks / VerifyPattern do the same.

Engine CPU per request: ``time.process_time()`` (user + system of every
thread of this process, gRPC's own included) across each of the connector's
worker calls for it, ``start_load_kv`` and every ``get_finished`` until the one
that returned it, summed; not the step loop between them. The scheduler's calls
and the prefill engine's publish step are reported apart.
See docs/bench.md ("The connector path") for the method and the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrail_vllm import _build

# From a checkout the stubs always follow its proto/ (an installed package
# has them generated at build time and no proto/ beside it).
if _build.PROTO_ROOT.is_dir():
    _build.generate()

import grpc  # noqa: E402

from kvrail_vllm._pb.kvrail.v1 import kvrail_pb2 as pb  # noqa: E402
from kvrail_vllm._pb.kvrail.v1 import kvrail_pb2_grpc as pb_grpc  # noqa: E402
from kvrail_vllm.client import Layout, SidecarClient  # noqa: E402
from kvrail_vllm.scheduler import KvrailScheduler  # noqa: E402
from kvrail_vllm.worker import DEFAULT_POLL_BACKOFF, KvrailWorker  # noqa: E402
from kvrail_vllm.agentproc import AgentExited, AgentProcess  # noqa: E402

TOKENS_PER_BLOCK = 16
"""vLLM's default block size in tokens: what the scheduler's token counts use."""

REQUEST_TIMEOUT_S = 120.0
"""Longest one request may take before the bench fails."""

PASS_BYTES = 256 << 20
"""Requests per pass, unless given: as many as move about this much (1 to 32)."""

GOAL_RATIO = 1.10
"""Issue 23's goal: the sidecar path within 10% of the direct path at 256 blocks."""

GOAL_CPU_US = 100.0
"""Issue 23's goal: under 100 us of engine CPU per request."""

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


class BenchError(RuntimeError):
    """The bench cannot go on; the message says what failed and where (as
    :class:`AgentExited` does for an agent that ended)."""


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 16KiB, 2MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _list(parse: Callable[[str], object]) -> Callable[[str], list]:
    def parse_list(text: str) -> list:
        items = [parse(t) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        return items

    return parse_list


def _transport(text: str) -> str:
    if text.strip() not in ("sm", "tcp"):
        raise argparse.ArgumentTypeError(f"transport {text!r}: sm or tcp")
    return text.strip()


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return v


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


# ---------------------------------------------------------------- agents


def _channel(target: str) -> grpc.Channel:
    # A Unix socket's default authority (its path) is not one the agent's
    # HTTP/2 server takes: name it localhost, as the Sidecar client does.
    return grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])


def wait_prefaulted(control: pb_grpc.ControlStub, what: str, timeout_s: float = 120.0) -> None:
    """Waits until the agent behind ``control`` has pre-faulted its peer
    mappings (``Stats.prefaulting`` is 0), so no pass times the first touch."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = control.Stats(pb.StatsRequest(), timeout=10).prefaulting
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the {what} agent still pre-faults {left} peer mappings after {timeout_s:.0f} s")
        time.sleep(0.01)


# ---------------------------------------------------------------- one request's figures


@dataclass
class Sample:
    latency_s: float
    cpu_s: float
    # Sidecar only: start_load_kv's share of cpu_s, get_finished calls made,
    # the decode scheduler's CPU, and the prefill engine's publish step.
    start_cpu_s: float = 0.0
    start_wall_s: float = 0.0
    calls: int = 0
    polls: int = 0
    skipped_cpu_s: float = 0.0
    sched_cpu_s: float = 0.0
    publish_cpu_s: float = 0.0


@dataclass
class Geometry:
    transport: str
    block_bytes: int
    num_blocks: int

    @property
    def region_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def layout(self) -> Layout:
        return Layout(block_bytes=self.block_bytes, num_blocks=self.num_blocks, num_layers=1, block_stride=self.block_bytes, layer_stride=self.region_bytes)


class Pattern:
    """Per-block content of the prefill engine's cache: block ``b`` is the
    slice of one random buffer starting at ``64 * b``, so every block differs
    from every other and from the poison."""

    def __init__(self, seed: int, g: Geometry):
        self.block_bytes = g.block_bytes
        self._base = random.Random(seed).randbytes(g.block_bytes + 64 * g.num_blocks)
        self.poison = bytes([0x5A]) * g.block_bytes

    def block(self, b: int) -> bytes:
        return self._base[64 * b : 64 * b + self.block_bytes]


class Engine:
    """What a vLLM worker holds: its KV cache as a shared file (a memfd, as
    torch's ``_share_fd_cpu_`` gives) mapped here, its agent, and the
    connector's worker and scheduler sides."""

    def __init__(self, role: str, g: Geometry, binary: str, workdir: Path, env: dict[str, str], name: str, poll_backoff: float):
        self.g = g
        self.role = role
        self.fd = os.memfd_create(f"kvrail-bench-{role}")
        os.ftruncate(self.fd, g.region_bytes)
        self.mem = mmap.mmap(self.fd, g.region_bytes)
        self.socket = str(workdir / f"{name}.sock")
        args = [role, "--region-from-client", "--local-socket", self.socket, "--transport", g.transport, "--agent-id", name]
        self.agent = AgentProcess([binary, *args], workdir / f"{name}.log", env)
        self.worker = KvrailWorker(SidecarClient(self.socket), poll_backoff=poll_backoff)
        self.scheduler = KvrailScheduler("producer" if role == "prefill" else "consumer", f"engine-{name}")

    def attach(self) -> None:
        self.agent.event("waiting_for_region")
        self.worker.attach_host(
            fd=self.fd, region_bytes=self.g.region_bytes, layout=self.g.layout(), engine_id=self.scheduler.engine_id, role=self.role, model_hash="bench-model"
        )
        ready = self.agent.event("ready")
        self.listen = ready["listen"]
        self.ucx_version = ready.get("ucx_version", "")
        # Control is on the agent's TCP port (its local socket serves the
        # Sidecar API only when the region comes from the client).
        self._control_channel = _channel(self.listen)
        self.control = pb_grpc.ControlStub(self._control_channel)
        self.scheduler.set_agent(self.worker.agent_id, self.worker.agent_address)

    def write_block(self, b: int, data: bytes) -> None:
        o = b * self.g.block_bytes
        self.mem[o : o + self.g.block_bytes] = data

    def block(self, b: int) -> bytes:
        o = b * self.g.block_bytes
        return self.mem[o : o + self.g.block_bytes]

    def close(self) -> None:
        self.worker.client.close()
        if hasattr(self, "_control_channel"):
            self._control_channel.close()
        self.agent.stop()
        self.mem.close()
        os.close(self.fd)


class Req:
    """The fields of vLLM's Request that the connector's scheduler reads."""

    def __init__(self, request_id: str, tokens: int, params: dict | None):
        self.request_id = request_id
        self.prompt_token_ids = range(tokens)
        self.kv_transfer_params = params


class SidecarPath:
    """Two engines on agents started with ``--region-from-client``; a request
    goes through the connector's scheduler and worker code."""

    name = "sidecar"

    def __init__(self, g: Geometry, binary: str, workdir: Path, env: dict[str, str], seed: int, step_s: float, poll_backoff: float):
        self.g, self.step_s = g, step_s
        self.pattern = Pattern(seed, g)
        self.engines: list[Engine] = []
        try:
            self.decode = Engine("decode", g, binary, workdir, env, "sidecar-decode", poll_backoff)
            self.engines.append(self.decode)
            self.decode.attach()
            self.prefill = Engine("prefill", g, binary, workdir, env, "sidecar-prefill", poll_backoff)
            self.engines.append(self.prefill)
            self.prefill.attach()
        except BaseException:
            self.close()
            raise
        self.ucx_version = self.prefill.ucx_version
        for b in range(g.num_blocks):
            self.prefill.write_block(b, self.pattern.block(b))
            self.decode.write_block(b, self.pattern.poison)
        self.n = 0
        self.verified = 0

    def request(self, src: list[int], dst: list[int], verify: bool) -> Sample:
        self.n += 1
        p_id, d_id = f"p-{self.n}", f"d-{self.n}"
        tokens = len(src) * TOKENS_PER_BLOCK
        if verify:
            for b in dst:
                self.decode.write_block(b, self.pattern.poison)
        # Prefill engine: the request finished its prefill; the connector
        # publishes its blocks at the next step.
        c = time.process_time()
        p_sched, p_work = self.prefill.scheduler, self.prefill.worker
        hold, params = p_sched.request_finished(Req(p_id, tokens, {"do_remote_decode": True}), src, finished_normally=True)
        if not hold or params is None:
            raise BenchError("the prefill scheduler did not hold the request's blocks")
        p_work.run_step(p_sched.build_step())
        publish_cpu = time.process_time() - c
        # Decode engine: the proxy passed the params on; no prefix-cache hit.
        req = Req(d_id, tokens, dict(params))
        d_sched, d_work = self.decode.scheduler, self.decode.worker
        c = time.process_time()
        count, load_async = d_sched.num_new_matched_tokens(req, 0)
        d_sched.after_alloc(req, dst, count)
        plan = d_sched.build_step()
        sched_cpu = time.process_time() - c
        if not load_async or len(plan.pulls) != 1:
            raise BenchError(f"the decode scheduler planned {len(plan.pulls)} pulls (load async: {load_async}), not one")
        # Timed: start_load_kv, then get_finished once per engine step.
        # Engine CPU: the connector's calls only (each one's process time,
        # gRPC's threads included while it runs), not the loop between them.
        rpcs0 = d_work.polls
        t0, c0 = time.perf_counter(), time.process_time()
        refused = d_work.run_step(plan)
        start_cpu, start_wall = time.process_time() - c0, time.perf_counter() - t0
        calls, finished_cpu, skipped_cpu, failed = 0, 0.0, 0.0, {}
        while not refused:
            step, c, before = time.perf_counter(), time.process_time(), d_work.polls
            _, recving, failed = d_work.results()
            spent = time.process_time() - c
            finished_cpu += spent
            if d_work.polls == before:
                skipped_cpu += spent
            calls += 1
            if d_id in recving:
                break
            if step - t0 > REQUEST_TIMEOUT_S:
                raise BenchError(f"sidecar pull {d_id} not finished after {REQUEST_TIMEOUT_S:.0f} s; decode agent's log:\n{self.decode.agent.log_tail()}")
            if self.step_s:
                time.sleep(max(0.0, step + self.step_s - time.perf_counter()))
        t1 = time.perf_counter()
        if refused:
            failed = d_work.results()[2]  # a refusal's reason comes with the step's results
        if d_id in failed:
            raise BenchError(f"sidecar pull {d_id} failed: {failed[d_id]}; decode agent's log:\n{self.decode.agent.log_tail()}")
        c = time.process_time()
        d_sched.finished_recving({d_id})
        sched_cpu += time.process_time() - c
        # The prefill engine hears its blocks were read before the next request.
        sending: set[str] = set()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while p_id not in sending:
            sending |= p_work.results()[0]
            if time.monotonic() > deadline:
                raise BenchError(f"published request {p_id} never reported finished_sending; prefill agent's log:\n{self.prefill.agent.log_tail()}")
            if p_id not in sending:
                time.sleep(self.step_s or 0.0002)
        if verify:
            for s, d in zip(src, dst):
                if self.decode.block(d) != self.pattern.block(s):
                    raise BenchError(f"sidecar: decode block {d} does not hold prefill block {s} after pull {d_id}")
            self.verified += len(dst)
        return Sample(
            t1 - t0,
            start_cpu + finished_cpu,
            start_cpu_s=start_cpu,
            start_wall_s=start_wall,
            calls=calls,
            polls=d_work.polls - rpcs0,
            skipped_cpu_s=skipped_cpu,
            sched_cpu_s=sched_cpu,
            publish_cpu_s=publish_cpu,
        )

    def settle(self) -> None:
        wait_prefaulted(self.decode.control, "sidecar decode")
        wait_prefaulted(self.prefill.control, "sidecar prefill")

    def check_alive(self) -> None:
        self.decode.agent.check_alive()
        self.prefill.agent.check_alive()

    def close(self) -> None:
        for e in self.engines:
            e.close()
        self.engines = []


class DirectPath:
    """Two agents with regions of their own (same geometry, application
    memory like the engines' memfds) and ``Control.Transfer`` on the decode
    agent's local socket."""

    name = "direct"

    def __init__(self, g: Geometry, binary: str, workdir: Path, env: dict[str, str], seed: int, region: str):
        self.g, self.seed = g, seed
        common = ["--transport", g.transport, "--region-bytes", str(g.region_bytes), "--block-bytes", str(g.block_bytes), "--test-patterns"]
        if region == "mmap":
            common.append("--mmap-region")
        self.agents: list[AgentProcess] = []
        self._channels: list[grpc.Channel] = []
        sockets = [str((workdir / f"direct-{role}.sock").resolve()) for role in ("decode", "prefill")]
        try:
            for role, sock in zip(("decode", "prefill"), sockets):
                a = AgentProcess([binary, role, "--agent-id", f"direct-{role}", "--local-socket", sock, *common], workdir / f"direct-{role}.log", env)
                self.agents.append(a)
                ready = a.event("ready")
            self.prefill_addr = ready["listen"]
            self.ucx_version = ready.get("ucx_version", "")
            self._channels = [_channel(f"unix://{sock}") for sock in sockets]
            self.control, self.prefill_control = (pb_grpc.ControlStub(c) for c in self._channels)
            self.prefill_control.FillPattern(pb.FillPatternRequest(seed=seed), timeout=120)
        except BaseException:
            self.close()
            raise
        self.n = 0
        self.verified = 0

    def request(self, src: list[int], dst: list[int], verify: bool) -> Sample:
        self.n += 1
        rid = f"direct-{self.n}"
        if verify:
            self.control.PoisonBlocks(pb.PoisonBlocksRequest(blocks=dst), timeout=60)
        req = pb.SubmitRequest(request_id=rid, peer="direct-prefill", peer_address=self.prefill_addr, mode=pb.TRANSFER_MODE_READ, src_blocks=src, dst_blocks=dst)
        t0, c0 = time.perf_counter(), time.process_time()
        resp = self.control.Transfer(req, timeout=REQUEST_TIMEOUT_S)
        t1, c1 = time.perf_counter(), time.process_time()
        if resp.state != pb.REQUEST_STATE_DONE:
            raise BenchError(f"direct transfer {rid} ended {pb.RequestState.Name(resp.state)}: {resp.error}; decode agent's log:\n{self.agents[0].log_tail()}")
        if verify:
            v = self.control.VerifyPattern(pb.VerifyPatternRequest(seed=self.seed, src_blocks=src, dst_blocks=dst), timeout=60)
            if v.bad_blocks or v.verified_blocks != len(dst):
                raise BenchError(f"direct: {v.bad_blocks} of {len(dst)} blocks wrong after {rid} ({v.verified_blocks} verified): {v.first_error}")
            self.verified += v.verified_blocks
        return Sample(t1 - t0, c1 - c0)

    def settle(self) -> None:
        wait_prefaulted(self.control, "direct decode")
        wait_prefaulted(self.prefill_control, "direct prefill")

    def check_alive(self) -> None:
        for a in self.agents:
            a.check_alive()

    def close(self) -> None:
        for c in self._channels:
            c.close()
        for a in self.agents:
            a.stop()
        self._channels, self.agents = [], []


class DirectOnEngineRegions:
    """``Control.Transfer`` on the sidecar path's own agents (the engines'
    memfd regions, the same session): only the API differs. Control is on
    the decode agent's TCP port, as an agent on a client's region serves
    the Sidecar API alone on its local socket."""

    name = "direct"

    def __init__(self, sc: SidecarPath):
        self.sc = sc
        self.ucx_version = sc.ucx_version
        self.n = 0
        self.verified = 0

    def request(self, src: list[int], dst: list[int], verify: bool) -> Sample:
        self.n += 1
        rid = f"direct-{self.n}"
        decode, prefill, pattern = self.sc.decode, self.sc.prefill, self.sc.pattern
        if verify:
            for b in dst:
                decode.write_block(b, pattern.poison)
        req = pb.SubmitRequest(request_id=rid, peer=prefill.worker.agent_id, peer_address=prefill.listen, mode=pb.TRANSFER_MODE_READ, src_blocks=src, dst_blocks=dst)
        t0, c0 = time.perf_counter(), time.process_time()
        resp = decode.control.Transfer(req, timeout=REQUEST_TIMEOUT_S)
        t1, c1 = time.perf_counter(), time.process_time()
        if resp.state != pb.REQUEST_STATE_DONE:
            raise BenchError(f"direct transfer {rid} ended {pb.RequestState.Name(resp.state)}: {resp.error}; decode agent's log:\n{decode.agent.log_tail()}")
        if verify:
            for s, d in zip(src, dst):
                if decode.block(d) != pattern.block(s):
                    raise BenchError(f"direct: decode block {d} does not hold prefill block {s} after {rid}")
            self.verified += len(dst)
        return Sample(t1 - t0, c1 - c0)

    def settle(self) -> None:
        pass

    def check_alive(self) -> None:
        self.sc.check_alive()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- a point


@dataclass
class Side:
    p50_ms: float
    p99_ms: float
    gbps: float
    samples: int
    latency_ms: list[float]
    engine_cpu_us: float
    extra: dict = field(default_factory=dict)


def summarize(samples: list[Sample], request_bytes: int, sidecar: bool) -> Side:
    lat = [s.latency_s for s in samples]
    p50 = percentile(lat, 0.5)
    side = Side(
        p50_ms=round(p50 * 1e3, 4),
        p99_ms=round(percentile(lat, 0.99) * 1e3, 4),
        gbps=round(request_bytes / p50 / 1e9, 4),
        samples=len(samples),
        latency_ms=[round(v * 1e3, 4) for v in lat],
        engine_cpu_us=round(statistics.mean(s.cpu_s for s in samples) * 1e6, 1),
    )
    if sidecar:
        calls = sum(s.calls for s in samples)
        polls = sum(s.polls for s in samples)
        start = sum(s.start_cpu_s for s in samples)
        skipped = sum(s.skipped_cpu_s for s in samples)
        side.extra = {
            "engine_cpu_p50_us": round(percentile([s.cpu_s for s in samples], 0.5) * 1e6, 1),
            "start_load_kv_cpu_us": round(start / len(samples) * 1e6, 1),
            "start_load_kv_p50_ms": round(percentile([s.start_wall_s for s in samples], 0.5) * 1e3, 4),
            "get_finished_cpu_us": round((sum(s.cpu_s for s in samples) - start) / len(samples) * 1e6, 1),
            "get_finished_calls": round(calls / len(samples), 2),
            "poll_rpcs": round(polls / len(samples), 2),
            "cpu_per_poll_call_us": round((sum(s.cpu_s for s in samples) - start - skipped) / max(polls, 1) * 1e6, 1),
            "cpu_per_skipped_call_us": round(skipped / max(calls - polls, 1) * 1e6, 2),
            "scheduler_cpu_us": round(statistics.mean(s.sched_cpu_s for s in samples) * 1e6, 1),
            "prefill_publish_cpu_us": round(statistics.mean(s.publish_cpu_s for s in samples) * 1e6, 1),
        }
    return side


def run_point(sc: SidecarPath, direct: DirectPath, blocks: int, args, rng: random.Random, progress: Callable[[str], None]) -> dict:
    g = sc.g
    request_bytes = blocks * g.block_bytes
    per_pass = args.requests or max(1, min(32, PASS_BYTES // request_bytes))

    def plan() -> list[tuple[list[int], list[int]]]:
        return [(rng.sample(range(g.num_blocks), blocks), rng.sample(range(g.num_blocks), blocks)) for _ in range(per_pass)]

    def one_pass(path, reqs, verify) -> list[Sample]:
        out = [path.request(src, dst, verify) for src, dst in reqs]
        path.check_alive()
        return out

    # Warm-up: dials the sessions, pre-faults, verified; untimed.
    warm = plan()
    for path in (sc, direct):
        one_pass(path, warm, verify=True)
        path.settle()
    timed: dict[str, list[Sample]] = {"sidecar": [], "direct": []}
    pass_ratios = []
    for k in range(args.passes):
        progress(f"{g.transport} {human_bytes(g.block_bytes)} x {blocks}: pass {k + 1}/{args.passes}")
        reqs = plan()
        order = (sc, direct) if k % 2 == 0 else (direct, sc)
        got = {path.name: one_pass(path, reqs, verify=False) for path in order}
        for name, s in got.items():
            timed[name].extend(s)
        pass_ratios.append(statistics.median(s.latency_s for s in got["sidecar"]) / statistics.median(s.latency_s for s in got["direct"]))
    # Closing pass, verified; untimed.
    close = plan()
    for path in (direct, sc):
        one_pass(path, close, verify=True)
    s_side = summarize(timed["sidecar"], request_bytes, sidecar=True)
    d_side = summarize(timed["direct"], request_bytes, sidecar=False)
    ratio = s_side.p50_ms / d_side.p50_ms
    point = {
        "transport": g.transport,
        "blocks": blocks,
        "block_bytes": g.block_bytes,
        "request_bytes": request_bytes,
        "region_blocks": g.num_blocks,
        "passes": args.passes,
        "requests_per_pass": per_pass,
        "step_us": args.step_us,
        "poll_backoff": args.poll_backoff,
        "direct_region": args.direct_region,
        "sidecar": asdict(s_side),
        "direct": asdict(d_side),
        "ratio": round(ratio, 4),
        "ratio_p99": round(s_side.p99_ms / d_side.p99_ms, 4),
        "pass_ratio_median": round(statistics.median(pass_ratios), 4),
        "goal_ratio_met": (ratio <= GOAL_RATIO) if blocks >= 256 else None,
        "goal_cpu_met": s_side.engine_cpu_us < GOAL_CPU_US,
        "verified_blocks": {"sidecar": sc.verified, "direct": direct.verified},
        "ucx_version": sc.ucx_version,
        "grpcio": grpc.__version__,
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
    }
    sc.verified = direct.verified = 0
    return point


def table(points: list[dict]) -> str:
    head = (
        "| tl | block | blocks | sidecar p50 / p99 ms | direct p50 / p99 ms | sidecar / direct GB/s | ratio p50 | "
        "engine CPU us/req (start_load_kv + get_finished) | get_finished calls / Polls | direct call CPU us | verified |"
    )
    rows = [head, "|" + "---|" * 11]
    for p in points:
        s, d, x = p["sidecar"], p["direct"], p["sidecar"]["extra"]
        rows.append(
            f"| {p['transport']} | {human_bytes(p['block_bytes'])} | {p['blocks']} | {s['p50_ms']:.3f} / {s['p99_ms']:.3f} | "
            f"{d['p50_ms']:.3f} / {d['p99_ms']:.3f} | {s['gbps']:.2f} / {d['gbps']:.2f} | {p['ratio']:.3f} | "
            f"{s['engine_cpu_us']:.0f} ({x['start_load_kv_cpu_us']:.0f} + {x['get_finished_cpu_us']:.0f}) | {x['get_finished_calls']:.1f} / {x['poll_rpcs']:.1f} | "
            f"{d['engine_cpu_us']:.0f} | {p['verified_blocks']['sidecar']} + {p['verified_blocks']['direct']} |"
        )
    return "\n".join(rows)


def find_binary(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("KVRAIL_BIN"), shutil.which("kvrail")):
        if candidate:
            if not Path(candidate).is_file():
                raise BenchError(f"the kvrail binary {candidate} does not exist: build it (cargo build --release -p kvrail-agent) or pass --kvrail PATH")
            return str(candidate)
    raise BenchError("no kvrail binary: pass --kvrail PATH or set KVRAIL_BIN (cargo build --release -p kvrail-agent builds it)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m kvrail_vllm.bench", description="kvrail's vLLM connector path against the direct Control API path (docs/bench.md).")
    ap.add_argument("--json", action="store_true", help="one JSON object per point on stdout, nothing else")
    ap.add_argument("--transport", type=_list(_transport), default=["sm", "tcp"], help="comma list of sm, tcp (default sm,tcp)")
    ap.add_argument("--blocks", type=_list(_positive), default=[1, 16, 256], help="blocks per request, comma list (default 1,16,256)")
    ap.add_argument("--block-bytes", type=_list(parse_bytes), default=[16 << 10, 256 << 10, 2 << 20], help="bytes per block, comma list (default 16KiB,256KiB,2MiB)")
    ap.add_argument("--passes", type=_positive, default=8, help="timed passes per side and point (default 8)")
    ap.add_argument("--requests", type=int, default=0, help="requests per pass (default: about 256 MiB a pass, 1 to 32)")
    ap.add_argument("--step-us", type=float, default=100.0, help="the engines' step: get_finished once per this many us, sleeping between (default 100; 0: back to back)")
    ap.add_argument("--poll-backoff", type=float, default=DEFAULT_POLL_BACKOFF, help=f"the worker's poll backoff (KvrailWorker; default {DEFAULT_POLL_BACKOFF}; 0: a Poll every step)")
    ap.add_argument(
        "--direct-region",
        choices=("mmap", "ucx", "engine"),
        default="mmap",
        help="the direct path's agents and regions: agents of its own with kvrail's mmap (application memory, as the engines' memfds; default) "
        "or UCX-allocated regions, or engine: the sidecar path's own agents on the engines' memfds (Control on the decode agent's TCP port)",
    )
    ap.add_argument("--kvrail", help="the kvrail binary (default: $KVRAIL_BIN, else kvrail on PATH)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    for bb in args.block_bytes:
        if bb % 4096:
            ap.error(f"--block-bytes {bb}: a whole number of 4 KiB pages")
    if args.requests < 0 or args.step_us < 0:
        ap.error("--requests and --step-us are 0 or more")
    if not 0 <= args.poll_backoff <= 1:
        ap.error("--poll-backoff is a fraction, 0 to 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = find_binary(args.kvrail)
    except (BenchError, AgentExited) as e:
        print(f"kvrail bench: {e}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty() and not args.json

    def progress(msg: str) -> None:
        if tty:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)

    env = dict(os.environ, KVRAIL_CLUSTER_SECRET=secrets.token_hex(24))
    rng = random.Random(args.seed)
    points: list[dict] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="kvrail-bench-") as tmp:
        for transport in args.transport:
            for bb in args.block_bytes:
                g = Geometry(transport, bb, 2 * max(args.blocks))
                workdir = Path(tmp) / f"{transport}-{bb}"
                workdir.mkdir()
                sc = direct = None
                try:
                    progress(f"{transport} {human_bytes(bb)}: starting four agents")
                    sc = SidecarPath(g, binary, workdir, env, args.seed, args.step_us / 1e6, args.poll_backoff)
                    if args.direct_region == "engine":
                        direct = DirectOnEngineRegions(sc)
                    else:
                        direct = DirectPath(g, binary, workdir, env, args.seed, args.direct_region)
                    for blocks in args.blocks:
                        p = run_point(sc, direct, blocks, args, rng, progress)
                        p["binary"] = binary
                        points.append(p)
                        if args.json:
                            print(json.dumps(p), flush=True)
                except (BenchError, grpc.RpcError) as e:
                    ok = False
                    what = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                    print(f"\nkvrail bench: {transport} {human_bytes(bb)}: {what}", file=sys.stderr)
                    if args.json:
                        print(json.dumps({"transport": transport, "block_bytes": bb, "ok": False, "failure": what}), flush=True)
                finally:
                    for path in (sc, direct):
                        if path is not None:
                            path.close()
    progress("")
    if not args.json:
        print(table(points))
        print(f"binary {binary}; step {args.step_us:g} us; poll backoff {args.poll_backoff:g}; direct: {args.direct_region}; ratio = sidecar p50 / direct p50; GB/s from p50")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
