"""Trust-bundle updates apply live, during a continuous stream, with no error and no byte lost.

There is no root-rotation command yet (issue 6): the test adds a second root
to the server's store as a "prepared" root, as a rotation would, then removes
it again. Agents poll ``/v1/bundle``, swap their TLS contexts atomically, and
keep their live tunnels; new tunnels work with the bigger and the smaller bundle.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509

from tapproof.control import config as server_config
from tapproof.pki import certs
from tapproof.store import TrustRootRecord, open_store
from tests.integration import procs
from tests.integration.test_agent_renewal import Stream
from tests.pkifix import make_ca

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _roots(path: Path) -> int:
    return len(x509.load_pem_x509_certificates(path.read_bytes()))


def test_bundle_update_during_a_continuous_stream(tmp_path: Path) -> None:
    echo = procs.EchoServer()
    srv = procs.start_server(tmp_path / "srv")
    a = b = None
    try:
        b = procs.start_agent(
            tmp_path / "b", srv.token("b"), "--service", f"echo=127.0.0.1:{echo.port}", "--sync-interval", "1s"
        )
        a = procs.start_agent(tmp_path / "a", srv.token("a"), "--route", "127.0.0.1:0=echo@b", "--sync-interval", "1s")
        procs.wait_for(lambda: "b" in a.status()["registry_hosts"], 15, "a to learn b")
        started = time.monotonic()
        stream = Stream(a.route())
        time.sleep(3)

        new_root = make_ca(tmp_path / "next").root
        fp = certs.fingerprint(new_root)
        store = open_store(server_config.load(srv.data_dir).db)
        try:
            store.add_trust_root(
                TrustRootRecord(fp, certs.to_pem(new_root).decode(), "prepared", dt.datetime.now(dt.UTC))
            )
            for agent in (a, b):
                procs.wait_for(lambda ag=agent: _roots(ag.data_dir / "bundle.pem") == 2, 15, "the 2-root bundle")
                procs.wait_for(lambda ag=agent: ag.events("bundle-updated"), 5, "a bundle-updated line")
            sent, received, _ = procs.echo_roundtrip(a.route(), 1 << 20)  # new tunnel, new contexts
            assert sent == received

            store.remove_trust_root(fp)
            for agent in (a, b):
                procs.wait_for(lambda ag=agent: _roots(ag.data_dir / "bundle.pem") == 1, 15, "the 1-root bundle")
            sent, received, _ = procs.echo_roundtrip(a.route(), 1 << 20)
            assert sent == received
        finally:
            store.close()

        time.sleep(max(0.0, 30 - (time.monotonic() - started)))  # a 30-second stream in all
        stream.finish()
        assert not stream.errors, stream.errors
        assert stream.n_received == stream.n_sent > 1 << 20
        assert stream.received.hexdigest() == stream.sent.hexdigest()
    finally:
        for agent in (a, b):
            if agent is not None:
                agent.stop()
        srv.stop()
        echo.close()
