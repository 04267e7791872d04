"""The agent's data dir: ``A/agent.toml``, ``A/key.pem`` (0600), ``A/cert.pem``, ``A/bundle.pem``."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from tapproof.errors import ConfigError
from tapproof.fsutil import read_bytes, write_atomic
from tapproof.identity import check_name, check_trust_domain
from tapproof.tls.credentials import Credentials, TrustBundle


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
    def bundle(self) -> Path:
        """``A/bundle.pem``: trusted roots."""
        return self.root / "bundle.pem"

    def enrolled(self) -> bool:
        """True when the data dir holds an identity."""
        return self.identity.exists() and self.cert.exists() and self.key.exists()


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
    return Credentials.load(paths.key, paths.cert)


def load_bundle(paths: AgentPaths) -> TrustBundle:
    """Load the trust bundle."""
    from tapproof.errors import PKIError

    try:
        return TrustBundle.from_pem(read_bytes(paths.bundle, what="trust bundle"))
    except PKIError as exc:
        raise ConfigError(f"{paths.bundle}: {exc}") from exc


def save_bundle(paths: AgentPaths, bundle: TrustBundle) -> None:
    """Write the bundle atomically."""
    write_atomic(paths.bundle, bundle.to_pem())
