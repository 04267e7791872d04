"""Wire the probes to the checks for one host: an agent data dir and/or a server data dir."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from tapproof.agent import config as agent_config
from tapproof.agent.state import AgentPaths, load_bundle, load_credentials, load_identity
from tapproof.doctor import checks, probe
from tapproof.doctor.result import Check, Report, fail, ok, skip
from tapproof.errors import TapproofError
from tapproof.tls import context
from tapproof.units import parse_hostport

__all__ = ["Options", "run"]


@dataclasses.dataclass(frozen=True)
class Options:
    """What to check: ``agent_dir`` (an agent's data dir) and/or ``server_dir`` (a server's)."""

    agent_dir: Path | None = None
    config: Path | None = None  # the agent's --config TOML, to know its mode when it is not running
    admin: str | None = None  # the agent's admin address (default: its run file, its config, 127.0.0.1:7445)
    server_dir: Path | None = None
    timeout: float = 5.0


def run(opts: Options) -> Report:
    """Run every applicable check; never raises for a condition it can report."""
    out: list[Check] = []
    chain_probe: checks.ApiProbe | None = None
    if opts.agent_dir is not None:
        chain_probe = _agent(opts, out)
    if opts.server_dir is not None:
        server_probe = _server(opts, out)
        chain_probe = chain_probe or server_probe
    out.extend(_ca(chain_probe))
    return Report.of(out)


# --- agent ---------------------------------------------------------------------------------------
def _agent(opts: Options, out: list[Check]) -> checks.ApiProbe | None:
    assert opts.agent_dir is not None  # noqa: S101 - caller checked
    paths = AgentPaths(opts.agent_dir)
    now = probe.utcnow()
    if not paths.enrolled():
        out.append(
            fail(
                "agent.identity",
                f"{paths.root} is not an enrolled agent data dir (agent.toml, cert.pem, key.pem)",
                "enroll: `tapproof agent enroll --data-dir A --join JOIN` with a join string from "
                "`tapproof server token create --host NAME`; or pass the right --data-dir",
            )
        )
        return None
    try:
        ident = load_identity(paths)
        creds = load_credentials(paths)
        bundle = load_bundle(paths)
    except TapproofError as exc:
        out.append(fail("agent.identity", f"cannot load the identity: {exc}", "re-enroll this host"))
        return None
    mode = paths.key.stat().st_mode & 0o777
    if mode & 0o077:
        out.append(
            fail(
                "agent.identity",
                f"{paths.key} is readable by others (mode {mode:o})",
                f"chmod 600 {paths.key}; then consider the key exposed and revoke/re-enroll the host",
            )
        )
    else:
        out.append(ok("agent.identity", f"{creds.spiffe_id}, servers {', '.join(ident.servers)}"))
    leaf = dataclasses.replace(probe.validity(creds.leaf), subject=str(creds.spiffe_id))
    out.append(checks.leaf_certificate(leaf, now))

    raw, config_error = _agent_settings(opts.config)
    if config_error:
        out.append(fail("agent.config", config_error, "fix the file; `tapproof agent run --help` lists the keys"))
    status = _agent_runtime(opts, paths, raw, out)

    def ctx() -> SSL.Context:
        return context.client_context(creds, bundle)

    probes = [probe.probe_api(s, ident.trust_domain, ctx, timeout=opts.timeout) for s in ident.servers]
    best = checks.best_probe(probes)
    out.append(checks.server_api(probes, who="this host's certificate"))
    out.append(checks.pq_group(best or next((p for p in probes if p.group), None)))
    out.append(checks.clock_skew(best))
    local_roots = [(fp, probe.validity(r)) for fp, r in zip(bundle.fingerprints, bundle.roots, strict=True)]
    out.append(
        checks.trust_bundle(
            local_roots, best.bundle if best else None, now, age=probe.file_age(paths.bundle, probe.utcnow())
        )
    )
    out.append(_rules(raw, status))
    return best or next((p for p in probes if p.chain), None)


def _agent_settings(config_file: Path | None) -> tuple[dict[str, Any], str]:
    """The agent's settings from its config file and environment (unchecked), or an error."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = agent_config.read_file(config_file)
        except TapproofError as exc:
            return {}, str(exc)
    raw.update(agent_config.from_env())
    return raw, ""


def _run_file(paths: AgentPaths) -> dict[str, Any]:
    """``A/run/address.json`` of a live agent ({} when absent or its process is gone)."""
    try:
        data = json.loads((paths.root / "run" / "address.json").read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _agent_runtime(opts: Options, paths: AgentPaths, raw: dict[str, Any], out: list[Check]) -> dict[str, Any] | None:
    """agent.health and agent.ports; returns the agent's /status (None when it cannot be read)."""
    run_file = _run_file(paths)
    admin = opts.admin
    if admin is None:
        admin = run_file.get("admin") or str(raw.get("admin", agent_config.DEFAULT_ADMIN))
    if not admin:
        out.append(skip("agent.health", "the agent's admin endpoint is disabled (admin = '')"))
        out.append(skip("agent.ports", "not checked: no admin endpoint to ask"))
        return None
    code, body, error = probe.admin_get(admin, "/healthz", opts.timeout)
    reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
    out.append(checks.agent_health(admin, code, reason, error))
    if error:
        out.append(skip("agent.ports", "not checked: the agent does not answer"))
        return None
    code, status, error = probe.admin_get(admin, "/status", opts.timeout)
    if code != 200 or not isinstance(status, dict):
        out.append(skip("agent.ports", f"not checked: /status answered {code or error}"))
        return None
    ports: dict[str, str] = {"tunnel": str(status.get("tunnel") or "")}
    for label in ("transparent", "inbound"):
        if status.get(label):
            ports[label] = str(status[label])
    for listen, address in sorted((status.get("routes") or {}).items()):
        ports[f"route {listen}"] = str(address)
    out.append(checks.listeners({k: (a, probe.tcp_accepts(a, opts.timeout)) for k, a in ports.items() if a}))
    return status


def _port(address: Any) -> int | None:
    if not address:
        return None
    try:
        return parse_hostport(str(address), what="address", allow_zero=True)[1]
    except TapproofError:
        return None


def _rules(raw: dict[str, Any], status: dict[str, Any] | None) -> Check:
    """transparent.rules, with the mode from the running agent (else from its settings)."""
    if status is not None:
        expected = bool(status.get("transparent"))
        tport, iport = _port(status.get("transparent")), _port(status.get("inbound"))
    else:
        value = raw.get("transparent", False)
        expected = value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes"))
        tport = iport = None
    listing, error = probe.iptables_nat()
    return checks.transparent_rules(listing, expected=expected, transparent_port=tport, inbound_port=iport, error=error)


# --- server --------------------------------------------------------------------------------------
def _server(opts: Options, out: list[Check]) -> checks.ApiProbe | None:
    """The local control plane, called with the admin credentials of its data dir."""
    from tapproof.clock import SystemClock
    from tapproof.control import admin

    assert opts.server_dir is not None  # noqa: S101 - caller checked
    try:
        client = admin.admin_client(opts.server_dir, SystemClock())
    except TapproofError as exc:
        out.append(
            fail(
                "local-server.config",
                f"cannot act as admin of {opts.server_dir}: {exc}",
                "run as the server's user (it must read D/ca and the database), with the right --server-data-dir",
            )
        )
        return None
    factory: Callable[[], SSL.Context] = client.ctx_factory
    probes = [probe.probe_api(s, client.td, factory, timeout=opts.timeout) for s in client.servers]
    best = checks.best_probe(probes)
    api = checks.server_api(probes, who="the admin certificate")
    pq = checks.pq_group(best or next((p for p in probes if p.group), None))
    out.append(dataclasses.replace(api, name="local-server.api"))
    out.append(dataclasses.replace(pq, name="local-server.pq"))
    return best


# --- CA ------------------------------------------------------------------------------------------
def _ca(best: checks.ApiProbe | None) -> list[Check]:
    """The server's intermediate and root, from the chain it presents (leaf, intermediate, root)."""
    now = probe.utcnow()
    if best is None or len(best.chain) < 2:
        return [skip("ca.intermediate", "not checked: no server chain seen"), skip("ca.root", "not checked")]
    found = [checks.ca_certificate(best.chain[1], now, name="ca.intermediate", kind="intermediate")]
    if len(best.chain) >= 3:
        found.append(checks.ca_certificate(best.chain[-1], now, name="ca.root", kind="root"))
    else:
        found.append(skip("ca.root", "not checked: the server did not send its root"))
    return found
