"""deploy/k8s, offline: YAML parses, strict Kubernetes schemas (kubernetes-validate), and every command,
flag, setting and port agrees with the CLI and the defaults (7443 API, 7444 tunnel, 7445 agent admin,
7446 server metrics, 7447 transparent, 7448 inbound)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tapproof.agent import config as agent_config
from tapproof.cli.main import build_parser
from tapproof.control import config as server_config
from tapproof.units import parse_hostport

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def docs() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for name in kust["resources"]:
        out.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kust["namespace"] == "tapproof"
    assert [i["name"] for i in kust["images"]] == ["tapproof"]


def test_strict_schema_validation() -> None:
    kinds = []
    for doc in docs():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["DaemonSet", "Deployment", "Namespace", "Service", "Service", "StatefulSet"]


def test_schema_validation_can_fail() -> None:
    bad = copy.deepcopy(find("Deployment", "tapproof-server"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(find("DaemonSet", "tapproof-agent"))
    bad["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_server_matches_the_cli() -> None:
    dep = find("Deployment", "tapproof-server")
    assert dep["spec"]["replicas"] >= 2
    parser = build_parser()
    by_name = {c["name"]: c for c in containers(dep)}
    server = by_name["server"]
    ns = parser.parse_args(server["command"][1:])
    assert (ns.command, ns.server_command) == ("server", "run")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"api": 7443, "metrics": 7446}
    assert parse_hostport(ns.listen)[1] == ports["api"]
    assert parse_hostport(ns.metrics)[1] == ports["metrics"] == parse_hostport(server_config.DEFAULT_METRICS)[1]
    assert parse_hostport(server_config.DEFAULT_LISTEN)[1] == 7443
    migrate = parser.parse_args(by_name["migrate"]["command"][1:])
    assert (migrate.command, migrate.server_command) == ("server", "migrate")
    assert migrate.data_dir == ns.data_dir == Path("/data")
    for c in (server, by_name["migrate"], by_name["join-cluster"]):
        for key in env(c):
            assert key.startswith("TAPPROOF_"), key
            assert key.removeprefix("TAPPROOF_").lower() in (*server_config._KEYS, *server_config._CA_KEYS), key
    svc = find("Service", "tapproof-server")
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {7443: "api", 7446: "metrics"}
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert server["livenessProbe"]["tcpSocket"]["port"] == "api"
    assert server["readinessProbe"]["httpGet"]["port"] == "metrics"


def _script_argv(container: dict[str, Any], parser: Any) -> dict[str, Any]:
    """Every ``tapproof ...`` line of a container's shell script, parsed by the real CLI, by subcommand."""
    env_values = {
        "$TAPPROOF_TRUST_DOMAIN": "example.org",
        "$TAPPROOF_DB": "postgresql://db/x",
        "$TAPPROOF_NAME": "pod-1",
    }
    out = {}
    for line in container["command"][-1].splitlines():
        if line.strip().startswith("tapproof "):
            argv = [env_values.get(a, a) for a in shlex.split(line)[1:]]
            ns = parser.parse_args(argv)
            out[" ".join(argv[:3] if argv[1] == "ca" else argv[:2])] = ns
    return out


def test_server_replicas_join_the_cluster_with_their_own_intermediate() -> None:
    """No shared CA data dir: each pod joins under its own name; with the root key Secret it signs itself."""
    dep = find("Deployment", "tapproof-server")
    parser = build_parser()
    spec = dep["spec"]["template"]["spec"]
    init = spec["initContainers"]
    assert [c["name"] for c in init] == ["join-cluster", "migrate"]  # join (which migrates) before migrate
    cmds = _script_argv(init[0], parser)
    join, sign = cmds["server init"], cmds["server ca sign-intermediate"]
    assert join.join_cluster is True
    assert (join.data_dir, join.trust_domain, join.db, join.name) == (
        Path("/data"),
        "example.org",
        "postgresql://db/x",
        "pod-1",
    )
    assert sign.data_dir == Path("/data")
    script = init[0]["command"][-1]
    assert "/data/ca/root.key" in script  # the root key stays in the data dir: automatic intermediate rotation
    name = next(e for e in init[0]["env"] if e["name"] == "TAPPROOF_NAME")
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert volumes["root-key"]["secret"] == {"secretName": "tapproof-root", "optional": True, "defaultMode": 0o440}
    mounts = {m["name"]: m for m in init[0]["volumeMounts"]}
    assert mounts["root-key"]["readOnly"] is True
    assert "root-key" not in {m["name"] for m in spec["containers"][0]["volumeMounts"]}


def test_server_runs_unprivileged_on_a_read_only_root() -> None:
    dep = find("Deployment", "tapproof-server")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in containers(dep):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["image"] == "tapproof"
        assert "limits" in c["resources"]


def agent_argv(container: dict[str, Any]) -> list[str]:
    """The ``tapproof agent run ...`` argv at the end of the agent's start script."""
    script = container["command"][-1]
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("exec tapproof "))
    return [a for a in shlex.split(line)[2:] if a != "$@"]


def test_agent_matches_the_cli_and_defaults() -> None:
    ds = find("DaemonSet", "tapproof-agent")
    by_name = {c["name"]: c for c in containers(ds)}
    agent = by_name["agent"]
    ns = build_parser().parse_args(agent_argv(agent))
    assert (ns.command, ns.agent_command, ns.transparent, ns.mode) == ("agent", "run", True, "strict")
    assert ns.join_file == "/join/$NODE_NAME"  # read only on the first start, never on the command line
    settings = env(agent)
    raw = {
        k.removeprefix("TAPPROOF_").lower(): v.replace("$(HOST_IP)", "10.0.0.5")
        for k, v in settings.items()
        if k.startswith("TAPPROOF_")
    }
    assert set(raw) <= set(agent_config.KEYS)
    cfg = agent_config.check(
        {**raw, "transparent": True, "mode": ns.mode, "fleet_cidr": [raw["fleet_cidr"]]}, is_root=True
    )
    assert parse_hostport(cfg.listen_tunnel)[1] == 7444 == parse_hostport(agent_config.DEFAULT_LISTEN_TUNNEL)[1]
    assert cfg.admin == agent_config.DEFAULT_ADMIN == "127.0.0.1:7445"
    assert cfg.transparent_port == agent_config.DEFAULT_TRANSPARENT_PORT == 7447
    assert cfg.inbound_port == agent_config.DEFAULT_INBOUND_PORT == 7448
    assert cfg.advertise == "10.0.0.5:7444"
    assert agent["ports"] == [{"name": "tunnel", "containerPort": 7444, "hostPort": 7444}]
    for probe in ("livenessProbe", "readinessProbe"):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"]) == ("127.0.0.1", 7445)
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM drains for --drain-timeout before the kubelet kills it
    drain = agent_config.check({"drain_timeout": settings["TAPPROOF_DRAIN_TIMEOUT"]}).drain_timeout
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    repair = by_name["repair-rules"]["command"]
    assert repair == ["python", "-m", "tapproof.agent.transparent", "--repair"]


def test_agent_privileges_are_only_what_transparent_mode_needs() -> None:
    ds = find("DaemonSet", "tapproof-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    for c in containers(ds):
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert "privileged" not in sc
        assert c["image"] == "tapproof"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/tapproof-agent"
    assert volumes["join"]["secret"]["secretName"] == "tapproof-join"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert agent_argv(pod["containers"][0])[agent_argv(pod["containers"][0]).index("--data-dir") + 1] == "/data"


def test_secrets_referenced_are_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    referenced = set()
    for doc in docs():
        stack: list[Any] = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for key in ("secretKeyRef", "secret"):
                    if key in node and isinstance(node[key], dict):
                        referenced.add(node[key].get("name") or node[key].get("secretName"))
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    assert referenced == {"tapproof-db", "tapproof-root", "tapproof-join"}
    for name in referenced:
        assert f"kubectl -n tapproof create secret generic {name}" in text, name
