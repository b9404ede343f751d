"""Checks of the Kubernetes manifests in deploy/k8s/.

- Every object validates against Kubernetes' own OpenAPI schemas, strictly
  (an unknown field is an error), for the oldest release the manifests need
  (1.29: sidecar containers) and the newest the validator bundles
  (``kubernetes-validate`` from PyPI carries the schemas: nothing is fetched).
  ``kubeconform`` is not used: it is on no package registry this project
  reaches, and it downloads its schemas at run time.
- ``kubectl kustomize`` builds the kustomization (when kubectl is installed).
- Each pod is the sidecar shape: an engine beside its agent, the socket on a
  shared emptyDir, the engine's ``--kv-transfer-config`` the README's, its
  socket the agent's ``--local-socket``.
- The agents run: the real ``kvrail`` binary (KVRAIL_BIN, as the Python
  package's tests take it) is started with the manifests' own arguments, a
  real etcd with the etcd manifest's, only addresses and paths moved to this
  machine (loopback, free ports, a temporary folder). The test plays the
  kubelet's probes and the engines' attach, and moves one block from the
  prefill agent to the decode agent through the registry.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
from kvrail_vllm.agentproc import NO_BINARY, AgentProcess, kvrail_binary  # noqa: E402

K8S = REPO / "deploy" / "k8s"
MIN_KUBERNETES = "1.29.0"
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


def validator():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: scripts/setup installs it (pip install kubernetes-validate)")
    return kubernetes_validate


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def objects() -> list[tuple[str, dict]]:
    """(file, object) for every object of every file the kustomization lists."""
    out = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                out.append((name, doc))
    return out


def find(kind: str, name: str) -> dict:
    for _, o in objects():
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def pod_of(role: str) -> dict:
    return find("Deployment", f"kvrail-{role}")["spec"]["template"]["spec"]


def agent_of(pod: dict) -> dict:
    [agent] = [c for c in pod.get("initContainers", []) if c["name"] == "kvrail"]
    return agent


def engine_of(pod: dict) -> dict:
    [engine] = [c for c in pod["containers"] if c["name"] == "vllm"]
    return engine


def flags(args: list[str]) -> dict[str, str | bool]:
    """``--flag value`` and ``--flag=value`` pairs; a flag followed by another
    flag (or nothing) is a switch."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        a = args[i]
        assert a.startswith("--"), f"{a!r} is not a flag (at {i} in {args})"
        if "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[a] = args[i + 1]
            i += 1
        else:
            out[a] = True
        i += 1
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def port_named(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    [p] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return p


def readme_kv_transfer_config() -> dict:
    text = (REPO / "README.md").read_text()
    deploying = text[text.index("## Deploying") :]
    [cfg] = re.findall(r"--kv-transfer-config '(\{.*?\})'\n", deploying)
    return json.loads(cfg)


def test_every_object_validates_against_the_kubernetes_schemas():
    kv = validator()
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml lists {sorted(listed)} but deploy/k8s has {sorted(on_disk)}"
    checked = 0
    for version in (MIN_KUBERNETES, kv.latest_version()):
        for name, obj in objects():
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']} is not valid Kubernetes {version}: {e.message} at {list(e.path)}")
            checked += 1
    assert checked >= 2 * 7


def test_the_validator_refuses_broken_manifests():
    kv = validator()
    dep = find("Deployment", "kvrail-prefill")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["imagee"] = typo["spec"]["template"]["spec"]["containers"][0].pop("image")
    bad_port = copy.deepcopy(dep)
    bad_port["spec"]["template"]["spec"]["initContainers"][0]["ports"][0]["containerPort"] = "seven thousand"
    no_selector = copy.deepcopy(dep)
    del no_selector["spec"]["selector"]
    for broken in (typo, bad_port, no_selector):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, kv.latest_version(), strict=True)


def test_kustomize_builds_the_manifests_with_their_images():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the kustomization; the schema check above does not need it)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted((o["kind"], o["metadata"]["name"]) for _, o in objects())
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization()["images"]}
    for d in built:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            assert c["image"] in images.values(), f"{d['metadata']['name']}/{c['name']}: image {c['image']} is not set by kustomization.yaml"


@pytest.mark.parametrize("role", ROLES)
def test_each_pod_is_an_engine_beside_its_agent_sharing_the_socket(role):
    pod = pod_of(role)
    agent, engine = agent_of(pod), engine_of(pod)
    assert agent.get("restartPolicy") == "Always", "the agent is a sidecar container: started before the engine, stopped after it"
    argv = agent["command"] + agent["args"]
    assert argv[:2] == ["kvrail", role]
    f = flags(argv[2:])
    assert f["--region-from-client"] is True
    env = env_of(agent)

    # Every $(VAR) the arguments use is defined, by the downward API or the ConfigMap.
    for var in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert var in env, f"{role}: the agent's arguments use $({var}), which its env does not define"
    assert f["--agent-id"] == "$(POD_NAME)" and env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    listen_port = int(str(f["--listen"]).rsplit(":", 1)[1])
    assert f["--advertise"] == f"$(POD_IP):{listen_port}" and env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert f["--registry"] == "$(KVRAIL_REGISTRY)"
    ref = env["KVRAIL_REGISTRY"]["valueFrom"]["configMapKeyRef"]
    registry = find("ConfigMap", ref["name"])["data"][ref["key"]]
    m = re.fullmatch(r"etcd://([\w.-]+):(\d+)/(\w+)", registry)
    assert m, registry
    etcd = find("Service", m.group(1))
    assert int(m.group(2)) in [p["port"] for p in etcd["spec"]["ports"]]

    # Ports and probes: the kubelet probes the port the agent listens on.
    assert port_named(agent, "kvrail") == listen_port
    assert port_named(agent, agent["startupProbe"]["tcpSocket"]["port"]) == listen_port
    assert port_named(agent, agent["livenessProbe"]["tcpSocket"]["port"]) == listen_port
    assert agent["readinessProbe"]["grpc"]["port"] == listen_port
    assert port_named(agent, "metrics") == int(str(f["--metrics"]).rsplit(":", 1)[1])

    # The secret is a file from a Secret volume, never an argument or a variable.
    secret_file = Path(str(f["--cluster-secret-file"]))
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in agent["volumeMounts"] if m["mountPath"] == str(secret_file.parent)]
    secret = volumes[mount["name"]]["secret"]
    assert any(i["path"] == secret_file.name for i in secret["items"])
    assert "KVRAIL_CLUSTER_SECRET" not in env

    # The engine loads KvrailConnector exactly as the README says, for its role,
    # on the agent's socket, which both containers see on one emptyDir.
    eargs = engine["args"]
    cfg = json.loads(eargs[eargs.index("--kv-transfer-config") + 1])
    assert cfg == dict(readme_kv_transfer_config(), kv_role=ROLES[role])
    socket_path = Path(cfg["kv_connector_extra_config"]["socket"].replace("{rank}", "0"))
    assert str(socket_path) == f["--local-socket"]
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]}.get(str(socket_path.parent)) for c in (agent, engine)]
    assert mounts[0] is not None and mounts[0] == mounts[1], f"{role}: the engine and the agent do not share {socket_path.parent}"
    assert "emptyDir" in volumes[mounts[0]]

    # One user for both (the agent takes regions only from its own user) ...
    uid = pod["securityContext"]["runAsUser"]
    for c in (agent, engine):
        assert c.get("securityContext", {}).get("runAsUser", uid) == uid
    # ... and room in /dev/shm for the KV cache the connector moves there.
    [shm] = [m["name"] for m in engine["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    dshm = volumes[shm]["emptyDir"]
    assert dshm["medium"] == "Memory"
    kv_gib = int(env_of(engine)["VLLM_CPU_KVCACHE_SPACE"]["value"])
    assert gib(dshm["sizeLimit"]) > kv_gib and gib(engine["resources"]["limits"]["memory"]) >= 2 * kv_gib + 1


def gib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert m, quantity
    return int(m.group(1)) / (1024 if m.group(2) == "Mi" else 1)


# The agents and etcd, run as the manifests say.


def kvrail_bin() -> Path:
    found = kvrail_binary(REPO)
    if found is None:
        pytest.skip(NO_BINARY)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Here:
    """Moves a manifest's addresses and paths to this machine: every host to
    127.0.0.1, every port to a free one (the same manifest port to the same
    free port), and the paths given."""

    def __init__(self, paths: dict[str, str], ports: dict[int, int] | None = None):
        self.ports: dict[int, int] = dict(ports or {})
        self.paths = paths

    def port(self, p: int) -> int:
        return self.ports.setdefault(p, free_port())

    def value(self, v: str) -> str:
        if v in self.paths:
            return self.paths[v]
        return re.sub(r"(?<![\w.-])[\w.-]+:(\d+)\b", lambda m: f"127.0.0.1:{self.port(int(m.group(1)))}", v)

    def args(self, args: list[str], env: dict[str, str]) -> list[str]:
        """Expands $(VAR) as the kubelet does, then moves the values here."""
        expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
        return [a if a.startswith("--") else self.value(a) for a in expanded]


@pytest.fixture
def procs():
    started: list[AgentProcess] = []

    def start(argv, log, env):
        p = AgentProcess(argv, log, env)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()


def start_etcd(procs, tmp_path: Path, here: Here) -> None:
    """The etcd manifest's container, here."""
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        pytest.fail("etcd is not installed: scripts/setup installs Debian's etcd-server and etcd-client")
    [c] = find("Deployment", "kvrail-etcd")["spec"]["template"]["spec"]["containers"]
    here.paths[flags(c["args"])["--data-dir"]] = str(tmp_path / "etcd")
    argv = [shutil.which(c["command"][0]), *here.args(c["args"], {})]
    procs(argv, tmp_path / "etcd.log", dict(os.environ))
    client = here.value(flags(c["args"])["--advertise-client-urls"])
    deadline = time.monotonic() + 20
    while subprocess.run(["etcdctl", "--endpoints", client, "--command-timeout=1s", "endpoint", "health"], capture_output=True, env=dict(os.environ, ETCDCTL_API="3")).returncode != 0:
        assert time.monotonic() < deadline, f"etcd did not answer at {client} within 20 s: {(tmp_path / 'etcd.log').read_text()[-2000:]}"
        time.sleep(0.1)


def agent_argv(role: str, here: Here) -> list[str]:
    """The agent container's command line, as the kubelet makes it (the
    downward API's pod name and IP, the ConfigMap's registry), then moved here."""
    agent = agent_of(pod_of(role))
    env = {"POD_NAME": f"kvrail-{role}-5d8c7b9f4-x2k7q", "POD_IP": "pod-ip", "KVRAIL_REGISTRY": find("ConfigMap", "kvrail")["data"]["registry"]}
    return [str(kvrail_bin()), *here.args(agent["args"], env)]


def health(port: int, timeout_s: float) -> str:
    """What the kubelet's grpc probe asks (grpc.health.v1 Check, service "")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_agents_run_with_the_manifests_arguments_and_answer_their_probes(procs, tmp_path):
    try:
        import grpc_health  # noqa: F401
    except ImportError:
        pytest.fail("grpcio-health-checking is not installed: scripts/setup installs it")
    from kvrail_vllm import _build

    _build.generate()
    from kvrail_vllm.client import Layout, SidecarClient

    secret = tmp_path / "cluster-secret"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o400)
    env = {k: v for k, v in os.environ.items() if k != "KVRAIL_CLUSTER_SECRET"}
    cluster = Here({})
    start_etcd(procs, tmp_path, cluster)
    registry = cluster.value(find("ConfigMap", "kvrail")["data"]["registry"])
    engines = {}
    for role in ROLES:
        # Each pod has its own ports; the etcd Service's port is the cluster's.
        here = Here({"/etc/kvrail/cluster-secret": str(secret), "/run/kvrail/0.sock": str(tmp_path / f"{role}.sock")}, cluster.ports)
        argv = agent_argv(role, here)
        a = procs(argv, tmp_path / f"{role}.log", env)
        waiting = a.event("waiting_for_region")
        assert waiting["agent_id"] == f"kvrail-{role}-5d8c7b9f4-x2k7q" and waiting["local_socket"] == str(tmp_path / f"{role}.sock")
        agent = agent_of(pod_of(role))
        port = here.ports[agent["readinessProbe"]["grpc"]["port"]]
        # Started and alive (tcpSocket) before the engine attaches, not ready (grpc).
        assert tcp_open(port)
        assert health(port, agent["readinessProbe"]["timeoutSeconds"]) in ("DEADLINE_EXCEEDED", "UNAVAILABLE")
        engines[role] = (a, here, port)

    layout = Layout(block_bytes=4096, num_blocks=8, num_layers=2, block_stride=4096, layer_stride=8 * 4096)
    attached = {}
    for role, (a, here, port) in engines.items():
        fd = os.memfd_create(f"kv-{role}")
        os.ftruncate(fd, layout.end())
        client = SidecarClient(str(tmp_path / f"{role}.sock"))
        agent_id, address = client.attach_host_region(fd=fd, region_bytes=layout.end(), tensors=[layout], engine_id=f"engine-{role}", role=role, model_hash="m")
        # The address the connector puts in kv_transfer_params is --advertise: $(POD_IP):7000.
        assert (agent_id, address) == (f"kvrail-{role}-5d8c7b9f4-x2k7q", f"127.0.0.1:{port}")
        a.event("ready")
        assert health(port, 2) == "SERVING"
        metrics_port = here.ports[port_named(agent_of(pod_of(role)), "metrics")]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"kvrail_rss_bytes" in r.read()
        attached[role] = (client, fd, agent_id, address)

    # Both are in the registry under their pod names, at their pod addresses.
    listed = subprocess.run([str(kvrail_bin()), "peers", "--registry", registry, "--json"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    entries = {e["agent_id"]: e["address"] for e in map(json.loads, listed.stdout.splitlines())}
    assert entries == {agent_id: address for (_, _, agent_id, address) in attached.values()}

    # One block, prefill to decode, the decode agent finding the prefill agent by
    # its address as a request's kv_transfer_params give it.
    pclient, pfd, pid, paddr = attached["prefill"]
    dclient, dfd, _, _ = attached["decode"]
    for layer in range(2):
        os.pwrite(pfd, bytes([0x40 + layer]) * 4096, layer * layout.layer_stride + 3 * 4096)
    pclient.publish("req-1", [[3]], lease_ms=10_000)
    dclient.pull("req-1", remote_agent_id=pid, remote_address=paddr, remote_request_id="req-1", local_blocks=[[5]], remote_blocks=[[3]])
    deadline = time.monotonic() + 20
    while "req-1" not in dclient.poll().recving:
        assert time.monotonic() < deadline, "the pull did not finish within 20 s"
        time.sleep(0.02)
    for layer in range(2):
        assert os.pread(dfd, 4096, layer * layout.layer_stride + 5 * 4096) == bytes([0x40 + layer]) * 4096
    for client, fd, _, _ in attached.values():
        client.close()
        os.close(fd)


def test_an_argument_the_binary_does_not_take_fails_the_run(tmp_path):
    """The check above could fail: the same arguments with one flag the binary
    lacks stop the agent at its argument parser."""
    here = Here({"/etc/kvrail/cluster-secret": str(tmp_path / "secret"), "/run/kvrail/0.sock": str(tmp_path / "0.sock")})
    argv = agent_argv("prefill", here) + ["--region-form-client"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--region-form-client" in out.stderr
