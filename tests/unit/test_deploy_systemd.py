"""deploy/systemd: the units verify, their sandbox scores stay low, and every command and setting exists.

``systemd-analyze verify`` needs the ExecStart binaries to exist, so a temp copy
points ``/opt/tapproof/bin/`` at this venv. ``systemd-analyze security --offline``
scores a unit's exposure from 0 (locked down) to 10 (a stock unit scores 9.6).
Thresholds: what is left for the server and the routes-mode agent is the
network access any network daemon needs (PrivateNetwork=, IPAddressDeny=,
AF_INET); the transparent agent adds root with CAP_NET_ADMIN/CAP_NET_RAW and
netlink, which is what transparent mode is.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tapproof.agent import config as agent_config
from tapproof.cli.main import build_parser
from tests.helpers import require_tool

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
VENV_BIN = str(Path(sys.executable).parent) + "/"
MAX_EXPOSURE = {"server": 1.5, "agent": 1.5, "agent-transparent": 2.5}


def units(tmp_path: Path, *, transparent: bool) -> Path:
    """A copy of the units (and, if asked, the transparent drop-in) with ExecStart paths in this venv."""
    out = tmp_path / ("transparent" if transparent else "base")
    out.mkdir()
    for name in ("tapproof-server.service", "tapproof-agent.service"):
        (out / name).write_text((SYSTEMD / name).read_text().replace("/opt/tapproof/bin/", VENV_BIN))
    if transparent:
        (out / "tapproof-agent.service.d").mkdir()
        conf = (SYSTEMD / "tapproof-agent.service.d" / "transparent.conf").read_text()
        (out / "tapproof-agent.service.d" / "transparent.conf").write_text(conf.replace("/opt/tapproof/bin/", VENV_BIN))
    return out


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", *args], cwd=unit_dir, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("transparent", [False, True])
def test_units_verify_cleanly(tmp_path: Path, transparent: bool) -> None:
    require_tool("systemd-analyze")
    d = units(tmp_path, transparent=transparent)
    res = analyze(d, "verify", "tapproof-server.service", "tapproof-agent.service")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # unknown keys and bad values are only warnings: none allowed


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are reported."""
    require_tool("systemd-analyze")
    d = units(tmp_path, transparent=False)
    unit = d / "tapproof-server.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=").replace(VENV_BIN, "/nonexistent/"))
    res = analyze(d, "verify", "tapproof-server.service")
    assert "Unknown key" in res.stderr
    assert "/nonexistent/tapproof" in res.stderr


@pytest.mark.parametrize(
    ("unit", "transparent", "key"),
    [
        ("tapproof-server.service", False, "server"),
        ("tapproof-agent.service", False, "agent"),
        ("tapproof-agent.service", True, "agent-transparent"),
    ],
)
def test_exposure_score(tmp_path: Path, unit: str, transparent: bool, key: str) -> None:
    require_tool("systemd-analyze")
    d = units(tmp_path, transparent=transparent)
    res = analyze(d, "security", "--offline=yes", "--no-pager", unit)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE[key], res.stdout


def read_unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    # systemd allows repeated keys; keep the last (enough for the keys checked here)
    cp.read_string(path.read_text())
    return cp


def test_hardening_and_capabilities() -> None:
    server = read_unit(SYSTEMD / "tapproof-server.service")["Service"]
    agent = read_unit(SYSTEMD / "tapproof-agent.service")["Service"]
    drop = read_unit(SYSTEMD / "tapproof-agent.service.d" / "transparent.conf")["Service"]
    for svc in (server, agent):
        assert svc["NoNewPrivileges"] == "yes"
        assert svc["ProtectSystem"] == "strict"
        assert svc["ProtectHome"] == "yes"
        assert svc["PrivateTmp"] == "yes"
        assert svc["PrivateDevices"] == "yes"
        assert svc["CapabilityBoundingSet"] == ""
        assert svc["AmbientCapabilities"] == ""
        assert svc["User"].startswith("tapproof-")
        assert svc["Restart"] == "on-failure"
        assert svc["ReadWritePaths"] == f"/var/lib/{svc['User']}"
    assert drop["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW"
    assert drop["User"] == "root"  # `agent run --transparent` refuses to start unless uid 0
    assert agent["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "ExecReload" not in server  # the server has no SIGHUP handler: a reload would kill it
    # the stop timeout covers the agent's default drain (10 s) with room for rule removal
    assert float(agent["TimeoutStopSec"].rstrip("s")) > agent_config.AgentConfig().drain_timeout


def test_commands_match_the_cli() -> None:
    """Every ExecStart parses with the real argument parser; the repair module takes --repair."""
    parser = build_parser()
    for name in ("tapproof-server.service", "tapproof-agent.service"):
        argv = shlex.split(read_unit(SYSTEMD / name)["Service"]["ExecStart"])
        assert argv[0] == "/opt/tapproof/bin/tapproof"
        args = [a for a in argv[1:] if a != "$AGENT_ARGS"]
        ns = parser.parse_args(args)
        assert ns.data_dir == Path(f"/var/lib/{name.removesuffix('.service')}")
    post = shlex.split(read_unit(SYSTEMD / "tapproof-agent.service.d" / "transparent.conf")["Service"]["ExecStopPost"])
    assert post[1:] == ["-m", "tapproof.agent.transparent", "--repair"]
    from tapproof.agent import transparent

    assert transparent.main(["--bogus"]) == 2  # the module's CLI exists and checks its argument


def test_example_settings_are_valid() -> None:
    raw = agent_config.read_file(SYSTEMD / "agent.toml.example")
    cfg = agent_config.check(raw)
    assert cfg.listen_tunnel.endswith(":7444")
    assert cfg.admin == "127.0.0.1:7445"
    from tapproof.control import config as server_config

    for line in (SYSTEMD / "server.env.example").read_text().splitlines():
        line = line.lstrip("# ")
        if line.startswith("TAPPROOF_"):
            key = line.split("=", 1)[0].removeprefix("TAPPROOF_").lower()
            assert key in server_config._KEYS, key
    assert "\nTAPPROOF_JOIN=tpj1." in (SYSTEMD / "agent.env.example").read_text()  # never --join: visible in ps


def test_sysusers_and_tmpfiles_apply_in_a_scratch_root(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles, run on a temp root, make the users, dirs and files."""
    require_tool("systemd-sysusers", "systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    for tool, conf in (
        ("systemd-sysusers", "sysusers.d-tapproof.conf"),
        ("systemd-tmpfiles", "tmpfiles.d-tapproof.conf"),
    ):
        extra = ["--create"] if tool == "systemd-tmpfiles" else []
        res = subprocess.run(
            [tool, f"--root={tmp_path}", *extra, str(SYSTEMD / conf)], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
    users = {ln.split(":")[0]: int(ln.split(":")[2]) for ln in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert {"tapproof-server", "tapproof-agent"} <= set(users)
    data = (tmp_path / "var" / "lib" / "tapproof-server").stat()
    assert data.st_uid == users["tapproof-server"]
    assert data.st_mode & 0o777 == 0o700
    assert (tmp_path / "etc" / "tapproof" / "agent.toml").read_text() == ""  # a valid, empty config
    assert (tmp_path / "run" / "xtables.lock").exists()
