"""Server configuration: ``D/server.toml`` written by ``init``, overridden by flags and env.

One name everywhere: flag ``--leaf-ttl``, key ``leaf_ttl``, variable ``TAPPROOF_LEAF_TTL``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from tapproof.errors import ConfigError
from tapproof.fsutil import write_atomic
from tapproof.identity import check_name, check_trust_domain
from tapproof.pki.expiry import parse_warn
from tapproof.units import format_duration, parse_duration, parse_hostport

DEFAULT_LISTEN = "127.0.0.1:7443"
DEFAULT_METRICS = "127.0.0.1:7446"
_KEYS = ("trust_domain", "db", "listen", "advertise", "leaf_ttl", "metrics", "unsafe_classical_groups")
_CA_KEYS = ("name", "intermediate_ttl", "expiry_warn")  # CA rotation (docs/rotation.md)
_RUN_KEYS = ("renew_grace",)  # run-time settings: server.toml, flag or env; not written by init
DEFAULT_RENEW_GRACE = dt.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything ``tapproof server`` needs to run."""

    data_dir: Path
    trust_domain: str
    db: str
    listen: str = DEFAULT_LISTEN
    advertise: tuple[str, ...] = ()  # addresses put into join strings; default: the listen address
    leaf_ttl: dt.timedelta = dt.timedelta(hours=1)
    metrics: str = DEFAULT_METRICS  # "" disables the Prometheus endpoint
    unsafe_classical_groups: bool = False  # run-time only (flag/env), never written by init
    # how long after expiry a host's latest, unrevoked certificate may still renew (0: never)
    renew_grace: dt.timedelta = DEFAULT_RENEW_GRACE
    name: str = "default"  # this server's name in the shared CA state (its intermediate); unique per database
    intermediate_ttl: dt.timedelta = dt.timedelta(days=90)  # lifetime of intermediates this server signs
    expiry_warn: str = "25%"  # thresholds: tapproof.pki.expiry

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        parse_hostport(self.listen, what="--listen", allow_zero=True)
        for a in self.advertise:
            parse_hostport(a, what="--advertise")
        if self.metrics:
            parse_hostport(self.metrics, what="--metrics", allow_zero=True)
        check_name(self.name, what="--name")
        parse_warn(self.expiry_warn)
        # 1m is for tests (rotation at half-life = 30 s); production keeps the 90d default
        if not dt.timedelta(minutes=1) <= self.intermediate_ttl <= dt.timedelta(days=3650):
            raise ConfigError("--intermediate-ttl: must be between 1m and 3650d")
        if not dt.timedelta(minutes=1) <= self.leaf_ttl <= dt.timedelta(days=30):
            raise ConfigError("--leaf-ttl: must be between 1m and 30d")
        if not (self.db.startswith("sqlite:///") or self.db.startswith("postgresql://")):
            raise ConfigError(f"--db: {self.db!r} is not sqlite:///PATH or postgresql://...")

    @property
    def path(self) -> Path:
        """``D/server.toml``."""
        return self.data_dir / "server.toml"

    def save(self) -> None:
        """Write ``D/server.toml`` (JSON strings are valid TOML basic strings)."""
        lines = [
            "# tapproof server configuration (written by `tapproof server init`)",
            f"trust_domain = {json.dumps(self.trust_domain)}",
            f"db = {json.dumps(self.db)}",
            f"listen = {json.dumps(self.listen)}",
            f"advertise = {json.dumps(list(self.advertise))}",
            f"leaf_ttl = {json.dumps(format_duration(self.leaf_ttl))}",
            f"metrics = {json.dumps(self.metrics)}",
            f"name = {json.dumps(self.name)}",
            f"intermediate_ttl = {json.dumps(format_duration(self.intermediate_ttl))}",
            f"expiry_warn = {json.dumps(self.expiry_warn)}",
        ]
        write_atomic(self.path, ("\n".join(lines) + "\n").encode(), mode=0o600)


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("1", "0", "true", "false", "yes", "no", ""):
        raise ConfigError(f"{what}: {value!r} is not true or false")
    return text in ("1", "true", "yes")


def default_db(data_dir: Path) -> str:
    """SQLite inside the data dir."""
    return f"sqlite:///{(Path(data_dir) / 'tapproof.db').resolve()}"


def load(data_dir: Path, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Load ``D/server.toml``, then environment ``TAPPROOF_*``, then ``overrides`` (flags; None = unset)."""
    data_dir = Path(data_dir)
    path = data_dir / "server.toml"
    if not path.exists():
        raise ConfigError(f"--data-dir: {data_dir} has no server.toml: run `tapproof server init` first")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(raw) - set(_KEYS) - set(_CA_KEYS) - set(_RUN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in (*_KEYS, *_CA_KEYS, *_RUN_KEYS):
        env = os.environ.get(f"TAPPROOF_{key.upper()}")
        if env is not None:
            raw[key] = env.split(",") if key == "advertise" else env
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        advertise = raw.get("advertise", [])
        if isinstance(advertise, str):
            advertise = [advertise]
        return ServerConfig(
            data_dir=data_dir,
            trust_domain=str(raw["trust_domain"]),
            db=str(raw.get("db") or default_db(data_dir)),
            listen=str(raw.get("listen", DEFAULT_LISTEN)),
            advertise=tuple(str(a) for a in advertise),
            leaf_ttl=parse_duration(str(raw.get("leaf_ttl", "1h")), what="leaf_ttl"),
            metrics=str(raw.get("metrics", DEFAULT_METRICS)),
            name=str(raw.get("name", "default")),
            intermediate_ttl=parse_duration(str(raw.get("intermediate_ttl", "90d")), what="intermediate_ttl"),
            expiry_warn=str(raw.get("expiry_warn", "25%")),
            unsafe_classical_groups=_flag(raw.get("unsafe_classical_groups", False), "--unsafe-classical-groups"),
            renew_grace=_grace(raw.get("renew_grace")),
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: missing key {exc.args[0]}") from exc


def _grace(value: Any) -> dt.timedelta:
    """``renew_grace``: a duration, or 0 to refuse every expired certificate (default 24h)."""
    if value is None:
        return DEFAULT_RENEW_GRACE
    text = str(value).strip()
    if text in ("0", "0s", "0m", "0h", "0d"):
        return dt.timedelta(0)
    grace = parse_duration(text, what="--renew-grace")
    if grace > dt.timedelta(days=30):
        raise ConfigError("--renew-grace: at most 30d (0 disables renewal after expiry)")
    return grace
