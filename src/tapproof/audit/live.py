"""``audit live``: capture with tcpdump into a temporary file for N seconds, then analyse it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

from tapproof.audit.errors import AuditInputError
from tapproof.audit.pipeline import AuditResult, Progress, analyze

__all__ = ["capture_live"]


def capture_live(
    iface: str,
    seconds: float,
    bpf: str | None = None,
    *,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> AuditResult:
    """Capture on ``iface`` for ``seconds`` (needs root and tcpdump), then analyse.

    Raises :class:`AuditInputError` when tcpdump is missing or refuses the
    interface or filter.
    """
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise AuditInputError("audit live: tcpdump not found on PATH")
    if seconds <= 0:
        raise AuditInputError("--seconds: must be positive")
    with tempfile.TemporaryDirectory(prefix="tapproof-audit-") as tmp:
        os.chmod(tmp, 0o777)  # noqa: S103  (tcpdump may drop privileges to its own user to write)
        path = os.path.join(tmp, "live.pcap")
        argv = [tcpdump, "-i", iface, "-w", path, "-U", "-s", "0", "-n"]
        if bpf:
            argv.append(bpf)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sleep(seconds)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not os.path.exists(path) or os.path.getsize(path) < 24:
            msg = err.decode("utf-8", "replace").strip().splitlines()
            raise AuditInputError(f"audit live: tcpdump failed: {msg[-1] if msg else 'no capture written'}")
        return analyze([path], progress=progress)
