"""The agent's data dir: ``A/agent.toml``, the key and certificate, ``A/bundle.pem``.

The key and its certificate are one pair and are replaced as one: each
renewal writes both into a new generation directory ``A/creds/gN/``
(``key.pem`` 0600, ``cert.pem``), fsyncs them, then switches the symlink
``A/current`` to it with one atomic rename. A crash or a full disk at any
point leaves either the old pair or the new one, never a mix. ``A/key.pem``
and ``A/cert.pem`` are symlinks through ``current`` for other readers.
Data dirs written before this layout (two plain files) are read as they
are and converted at the next renewal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import tomllib
from pathlib import Path

from tapproof.errors import ConfigError
from tapproof.fsutil import read_bytes, write_atomic
from tapproof.identity import check_name, check_trust_domain
from tapproof.logs import log_event
from tapproof.pki import certs, keys
from tapproof.tls.credentials import Credentials, TrustBundle

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentPaths:
    """File names inside an agent data dir."""

    root: Path

    @property
    def identity(self) -> Path:
        """``A/agent.toml``: trust domain, host name, servers."""
        return self.root / "agent.toml"

    @property
    def key(self) -> Path:
        """``A/key.pem`` (0600)."""
        return self.root / "key.pem"

    @property
    def cert(self) -> Path:
        """``A/cert.pem``: leaf + intermediate."""
        return self.root / "cert.pem"

    @property
    def current(self) -> Path:
        """``A/current``: symlink to the generation directory holding the live key and certificate."""
        return self.root / "current"

    def pair(self) -> tuple[Path, Path]:
        """(key, certificate) to load: the current generation, or the two plain files of the old layout."""
        if self.current.is_symlink() or self.current.is_dir():
            return self.current / "key.pem", self.current / "cert.pem"
        return self.key, self.cert

    @property
    def bundle(self) -> Path:
        """``A/bundle.pem``: trusted roots."""
        return self.root / "bundle.pem"

    def enrolled(self) -> bool:
        """True when the data dir holds an identity."""
        key, cert = self.pair()
        return self.identity.exists() and cert.exists() and key.exists()


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """Who this agent is and where its control plane is."""

    trust_domain: str
    host: str
    servers: tuple[str, ...]

    def to_toml(self) -> bytes:
        """Serialize (JSON strings are valid TOML basic strings)."""
        return (
            "# written by tapproof agent enroll\n"
            f"trust_domain = {json.dumps(self.trust_domain)}\n"
            f"host = {json.dumps(self.host)}\n"
            f"servers = {json.dumps(list(self.servers))}\n"
        ).encode()


def load_identity(paths: AgentPaths) -> AgentIdentity:
    """Read ``A/agent.toml``."""
    if not paths.identity.exists():
        raise ConfigError(f"--data-dir: {paths.root} is not enrolled: run with --join JOIN_STRING first")
    try:
        raw = tomllib.loads(read_bytes(paths.identity, what="agent.toml").decode())
        ident = AgentIdentity(
            check_trust_domain(str(raw["trust_domain"])),
            check_name(str(raw["host"]), what="host"),
            tuple(str(s) for s in raw["servers"]),
        )
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{paths.identity}: corrupt agent identity ({exc})") from exc
    if not ident.servers:
        raise ConfigError(f"{paths.identity}: no servers listed")
    return ident


def load_credentials(paths: AgentPaths) -> Credentials:
    """Load key + chain (key must match)."""
    return Credentials.load(*paths.pair())


def save_credentials(paths: AgentPaths, creds: Credentials) -> Path:
    """Write key and chain as one pair (a new generation, then one atomic switch); return its directory.

    Raises :class:`ConfigError` naming the data dir when the disk refuses
    (full, read-only): the current pair is untouched then.
    """
    gens = paths.root / "creds"
    gen = gens / f"g{time.time_ns()}"
    try:
        gens.mkdir(mode=0o700, exist_ok=True)
        gen.mkdir(mode=0o700)
        keys.save(creds.key, gen / "key.pem")
        write_atomic(gen / "cert.pem", certs.to_pem(creds.chain), mode=0o644)
        _fsync_dir(gens)
        _symlink_atomic(paths.current, os.path.relpath(gen, paths.root))
    except OSError as exc:
        shutil.rmtree(gen, ignore_errors=True)
        raise ConfigError(
            f"--data-dir: cannot write the new key and certificate in {paths.root}: {exc.strerror or exc} "
            "(the current ones are kept)"
        ) from exc
    # From here on `current` points at the new pair: a failure must never remove it.
    for name in ("key.pem", "cert.pem"):  # conveniences for other readers; loading goes through current
        try:
            _symlink_atomic(paths.root / name, f"current/{name}")
        except OSError as exc:
            log_event(log, "credential-link-failed", level=logging.WARNING, link=name, detail=str(exc))
    for old in gens.iterdir():  # older generations: nothing points at them any more
        if old != gen:
            shutil.rmtree(old, ignore_errors=True)
    return gen


def _symlink_atomic(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` with one rename (replacing a file or an older link)."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(link.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_bundle(paths: AgentPaths) -> TrustBundle:
    """Load the trust bundle."""
    from tapproof.errors import PKIError

    try:
        return TrustBundle.from_pem(read_bytes(paths.bundle, what="trust bundle"))
    except PKIError as exc:
        raise ConfigError(f"{paths.bundle}: {exc}") from exc


def save_bundle(paths: AgentPaths, bundle: TrustBundle) -> None:
    """Write the bundle atomically, if it changed (:class:`ConfigError` naming the data dir when the disk refuses)."""
    pem = bundle.to_pem()
    with contextlib.suppress(OSError):
        if paths.bundle.read_bytes() == pem:
            return
    try:
        write_atomic(paths.bundle, pem)
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot write {paths.bundle}: {exc.strerror or exc} (old one kept)") from exc
