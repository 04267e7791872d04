"""Fault: the disk under the agent's credential dir fills up (a tiny tmpfs, as root).

Host certificates live 1 minute and the agent renews at 10% of that (every
~6 s), so renewals keep coming while the disk is full. Each renewal writes
the new key and certificate into a new generation directory and switches one
symlink (``A/current``) atomically; a full disk must leave the old pair in
place, matched and loadable, fail the renewal cleanly (logged with the OS
reason, counted, retried), keep tunnels working, and recover on its own once
space is back. The agent is then killed and restarted on the same data dir:
it loads a matching pair.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapproof.agent.state import AgentPaths, load_credentials
from tests.battery.invariants import HashEcho, checked, stream
from tests.helpers import require_root
from tests.integration import procs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.root]


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (unmounted lazily after)."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write a file until the filesystem is full; return it (delete it to free the space)."""
    filler = path / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    # a few blocks can stay free for metadata: eat them with tiny files too
    for i in range(1000):
        try:
            (path / f"filler-{i}").write_bytes(b"\0" * 512)
        except OSError:
            break
    return filler


def free(path: Path) -> None:
    """Delete every filler file."""
    for p in path.glob("filler*"):
        p.unlink()


def _pair(paths: AgentPaths) -> tuple[bytes, bytes]:
    key, cert = paths.pair()
    return key.read_bytes(), cert.read_bytes()


def _renewals(agent: procs.AgentProc, result: str) -> float:
    return agent.metric("tapproof_agent_renewals_total", result=result)


def test_disk_full_under_agent_credentials(tmp_path: Path) -> None:
    require_root()
    echo = HashEcho()
    srv = procs.start_server(tmp_path / "srv", leaf_ttl="1m")
    a = b = None
    with tiny_tmpfs(tmp_path / "a") as fs:  # the data dir is the mount point; its log is beside it, outside
        try:
            b = procs.start_agent(tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}")
            a = procs.start_agent(fs, srv.token("a"), "--route", "127.0.0.1:0=echo@b", "--renew-fraction", "0.1")
            procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
            paths = AgentPaths(fs)
            procs.wait_for(lambda: _renewals(a, "success") >= 1, 30, "a first renewal")
            assert (paths.current).is_symlink()
            assert len(list((paths.root / "creds").iterdir())) == 1, "older generations are removed"

            with checked(tmp_path) as inv:
                inv.watch("a", a.proc.pid, log=a.log_path, metrics=f"http://{a.addresses['admin']}/metrics")
                fill(fs)
                before = _pair(paths)
                failures = _renewals(a, "failure")
                serial = a.status()["certificate"]["serial"]
                procs.wait_for(lambda: _renewals(a, "failure") >= failures + 2, 40, "renewals failing on a full disk")
                failed = [e for e in a.events("renewal-failed") if "No space left" in str(e.get("detail"))]
                assert failed, a.events("renewal-failed")[-3:]
                assert "current ones are kept" in failed[-1]["detail"] or "old one kept" in failed[-1]["detail"]
                # the old pair: untouched, matched, loadable; no half-written generation left behind
                assert _pair(paths) == before
                assert load_credentials(paths).leaf.serial_number == int(serial, 16)
                assert len(list((paths.root / "creds").iterdir())) == 1
                assert a.status()["certificate"]["serial"] == serial
                # tunnels still work on the current certificate
                end = stream(a.route(), 1 << 20, timeout=10)
                assert end.error is None, end.error
                assert end.received == 1 << 20

                free(fs)
                ok = _renewals(a, "success")
                procs.wait_for(lambda: _renewals(a, "success") > ok, 30, "a renewal once space is back")
                assert a.status()["certificate"]["serial"] != serial
                assert _pair(paths) != before
                assert a.admin_get("/healthz")[0] == 200

            # a crash and a restart on the same data dir: the pair on disk matches
            a.proc.kill()
            a.proc.wait(10)
            a = procs.start_agent(fs, None, "--route", "127.0.0.1:0=echo@b", "--renew-fraction", "0.1")
            end = procs.wait_for(
                lambda: (e := stream(a.route(), 1 << 20, timeout=5)).received == 1 << 20 and e, 10, "a tunnel"
            )
            assert end.error is None
            print(f"disk full: {len(failed)} renewals failed cleanly; recovered on its own once space was back")
        finally:
            for p in (a, b):
                if p is not None:
                    p.stop()
            srv.stop()
            echo.close()
            with contextlib.suppress(OSError):
                os.sync()
