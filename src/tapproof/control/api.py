"""HTTP+JSON API routing: (method, path, peer, body) in, (status, JSON) out. No sockets.

Authorization per route: ``public`` (only enrollment and the trust bundle),
``host`` (an enrolled agent's certificate), ``admin`` (the admin certificate,
``spiffe://TD/tapproof/admin``). Errors become ``{"error": {"code", "message"}}``
with a status from :func:`status_for`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

from prometheus_client import Counter

from tapproof import identity
from tapproof.control.service import ControlPlane, content_tag
from tapproof.errors import (
    APIError,
    ConfigError,
    Conflict,
    CSRRejected,
    EnrollmentRefused,
    NotFound,
    PeerRejected,
    PKIError,
    SchemaMismatch,
    StoreUnavailable,
    TapproofError,
)
from tapproof.logs import log_event
from tapproof.units import parse_duration

log = logging.getLogger(__name__)
REQUESTS = Counter("tapproof_server_requests", "API requests", ["route", "status"])
REFUSED = Counter("tapproof_server_refusals", "API requests refused", ["reason"])

Auth = Literal["public", "host", "admin"]
MAX_BODY = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Request:
    """One API request as the shell hands it over."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes
    peer: identity.SpiffeID | None
    source: str
    if_none_match: str = ""
    peer_serial: str = ""  # serial (hex) of the certificate the peer presented
    peer_key: bytes = b""  # SPKI DER of the key of the peer's TLS certificate (identity or bootstrap)
    peer_expired: bool = False  # the peer's certificate expired within the renewal grace: renewal only


@dataclasses.dataclass(frozen=True)
class Response:
    """One API response."""

    status: int
    body: Any  # JSON-able, None (no body), or bytes: JSON already encoded
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[ControlPlane, Request, re.Match[str]], Response]


def status_for(exc: TapproofError) -> tuple[int, str]:
    """Map an error to (HTTP status, machine-readable code)."""
    if isinstance(exc, EnrollmentRefused):
        return 403, exc.reason.value
    if isinstance(exc, CSRRejected):
        return 400, "csr-" + exc.reason.value
    if isinstance(exc, PeerRejected):
        return 403, exc.reason.value
    if isinstance(exc, ConfigError):
        return 400, "bad-request"
    if isinstance(exc, NotFound):
        return 404, "not-found"
    if isinstance(exc, Conflict):
        return 409, "conflict"
    if isinstance(exc, StoreUnavailable | SchemaMismatch):
        return 503, "store-unavailable"
    if isinstance(exc, APIError):
        return exc.status, exc.code
    if isinstance(exc, PKIError):
        return 500, "pki-error"
    return 500, "internal"


def _json(req: Request) -> dict[str, Any]:
    try:
        body = json.loads(req.body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, "bad-json", "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise APIError(400, "bad-json", "request body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = body.get(key, None if required else default)
    if value is None:
        raise APIError(400, "missing-field", f"field {key!r} is required")
    if not isinstance(value, str):
        raise APIError(400, "bad-field", f"field {key!r} must be a string")
    return value


def _issued(cp: ControlPlane, issued: Any) -> Response:
    return Response(
        200,
        {
            "spiffe_id": issued.spiffe_id,
            "certificate": issued.chain_pem,
            "bundle": issued.bundle_pem,
            "not_after": issued.not_after.isoformat(),
            "serial": issued.serial,
            "servers": cp.known_servers(),
        },
    )


def h_enroll(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    body = _json(req)
    # the CSR must be for the key the client proved in the TLS handshake (b"" never matches)
    return _issued(cp, cp.enroll(_str(body, "token"), _str(body, "csr"), req.source, tls_key=req.peer_key))


def h_renew(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    assert req.peer is not None  # noqa: S101 - guaranteed by the route's auth
    return _issued(cp, cp.renew(req.peer, _str(_json(req), "csr"), req.peer_serial, after_expiry=req.peer_expired))


def _tagged(req: Request, etag: str, body: Any) -> Response:
    """200 with ``ETag``, or 304 (same tag, no body) when the request's If-None-Match is that tag."""
    if req.if_none_match == etag:
        return Response(304, None, (("ETag", etag),))
    return Response(200, body, (("ETag", etag),))


def h_bundle(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    # "active": the root new certificates chain to; an agent whose chain ends elsewhere renews early
    body: dict[str, Any] = {"trust_domain": cp.td, "bundle": cp.bundle_pem(), "active": cp.ca.root_fingerprint}
    if req.peer is not None:  # enrolled agents keep their server list current from here
        body["servers"] = cp.known_servers()
    return _tagged(req, content_tag(body), body)  # the tag covers roots, active root and servers


def h_register(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    assert req.peer is not None  # noqa: S101
    body = _json(req)
    services = body.get("services", {})
    if not isinstance(services, dict) or not all(isinstance(v, str) for v in services.values()):
        raise APIError(400, "bad-field", "services must be an object of name -> description")
    bundle = body.get("bundle")
    if bundle is not None and not (isinstance(bundle, list) and all(isinstance(f, str) for f in bundle)):
        raise APIError(400, "bad-field", "bundle must be a list of root fingerprints")
    cp.register(req.peer, _str(body, "advertise"), services, bundle)
    return Response(200, {"ok": True})


def h_registry(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    etag, encoded = cp.registry_encoded()  # at 10,000 hosts encoding alone costs tens of ms: done once per version
    return _tagged(req, etag, encoded)


def h_policy(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    pol = cp.policy()
    return _tagged(req, f'"{pol["version"]}"', pol)


def h_revocations(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    body = cp.revocations()
    return _tagged(req, content_tag(body), body)


def h_token(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    body = _json(req)
    ttl = parse_duration(_str(body, "ttl", required=False, default="15m"), what="--ttl")
    return Response(201, {"join": cp.create_token(_str(body, "host"), ttl, str(req.peer))})


def h_rule_add(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    body = _json(req)
    rid = cp.add_rule(
        _str(body, "action"),
        _str(body, "source"),
        _str(body, "service"),
        _str(body, "ports", required=False),
        _str(body, "comment", required=False),
        str(req.peer),
    )
    return Response(201, {"id": rid})


def h_rule_remove(cp: ControlPlane, req: Request, m: re.Match[str]) -> Response:
    cp.remove_rule(int(m.group(1)), str(req.peer))
    return Response(200, {"ok": True})


def h_default(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    cp.set_default_policy(_str(_json(req), "default"), str(req.peer))
    return Response(200, {"ok": True})


def h_revoke(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    body = _json(req)
    reason = _str(body, "reason", required=False)
    if "host" in body:
        serials = cp.revoke_host(_str(body, "host"), reason, str(req.peer))
        return Response(200, {"revoked_serials": serials})
    if "serial" in body:
        return Response(200, {"revoked": cp.revoke_serial(_str(body, "serial"), reason, str(req.peer))})
    raise APIError(400, "missing-field", "give 'host' or 'serial'")


def h_status(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    soon = parse_duration(req.query.get("soon", "15m"), what="soon")
    st = cp.status(soon)
    if req.query.get("expiry_warn"):  # the CLI's --expiry-warn
        st.update(cp.ca_status(cp.clock.now(), req.query["expiry_warn"]))
    return Response(200, st)


def h_audit(cp: ControlPlane, req: Request, _m: re.Match[str]) -> Response:
    try:
        since = int(req.query.get("since", "0"))
        limit = max(1, min(int(req.query.get("limit", "1000")), 10000))
    except ValueError as exc:
        raise APIError(400, "bad-query", "since and limit must be integers") from exc
    entries = cp.store.list_audit(since_id=since, limit=limit)
    return Response(
        200,
        {
            "entries": [
                {"id": e.entry_id, "ts": e.ts.isoformat(), "actor": e.actor, "action": e.action, "detail": e.detail}
                for e in entries
            ]
        },
    )


def h_openapi(_cp: ControlPlane, _req: Request, _m: re.Match[str]) -> Response:
    return Response(200, json.loads(resources.files("tapproof.control").joinpath("openapi.json").read_text()))


def h_health(cp: ControlPlane, _req: Request, _m: re.Match[str]) -> Response:
    cp.store.get_setting("default_policy")  # touches the database: 503 if it is down
    return Response(200, {"ok": True, "time": dt.datetime.now(dt.UTC).isoformat()})


RETRY_AFTER = 5
"""Seconds a 503 asks the client to wait (agents back off on their own schedule anyway)."""


def _unavailable_response() -> Response:
    return Response(
        503,
        {
            "error": {
                "code": "store-unavailable",
                "message": "the control plane's database is unavailable: retry later or use another server",
            }
        },
        (("Retry-After", str(RETRY_AFTER)),),
    )


def unavailable(req: Request, exc: Exception) -> Response:
    """The 503 for a request that cannot be served because the database is down (logged and counted)."""
    REFUSED.labels("store-unavailable").inc()
    REQUESTS.labels("unavailable", "503").inc()
    log_event(
        log,
        "api-error",
        level=logging.ERROR,
        reason="store-unavailable",
        path=req.path,
        source=req.source,
        detail=str(exc),
    )
    return _unavailable_response()


ROUTES: list[tuple[str, re.Pattern[str], Auth, Handler]] = [
    ("POST", re.compile(r"^/v1/enroll$"), "public", h_enroll),
    ("GET", re.compile(r"^/v1/bundle$"), "public", h_bundle),
    ("GET", re.compile(r"^/v1/openapi\.json$"), "host", h_openapi),
    ("GET", re.compile(r"^/v1/healthz$"), "host", h_health),
    ("POST", re.compile(r"^/v1/renew$"), "host", h_renew),
    ("PUT", re.compile(r"^/v1/registration$"), "host", h_register),
    ("GET", re.compile(r"^/v1/registry$"), "host", h_registry),
    ("GET", re.compile(r"^/v1/policy$"), "host", h_policy),
    ("GET", re.compile(r"^/v1/revocations$"), "host", h_revocations),
    ("POST", re.compile(r"^/v1/tokens$"), "admin", h_token),
    ("POST", re.compile(r"^/v1/policy/rules$"), "admin", h_rule_add),
    ("DELETE", re.compile(r"^/v1/policy/rules/(\d{1,12})$"), "admin", h_rule_remove),
    ("PUT", re.compile(r"^/v1/policy/default$"), "admin", h_default),
    ("POST", re.compile(r"^/v1/revoke$"), "admin", h_revoke),
    ("GET", re.compile(r"^/v1/status$"), "admin", h_status),
    ("GET", re.compile(r"^/v1/audit$"), "admin", h_audit),
]


def _authorized(auth: Auth, peer: identity.SpiffeID | None) -> bool:
    if auth == "public":
        return True
    if peer is None:
        return False
    if auth == "admin":
        return peer.kind is identity.Kind.ADMIN
    # "host" routes: agents; the admin may read them too (policy list, registry)
    return peer.kind in (identity.Kind.HOST, identity.Kind.ADMIN)


def handle(cp: ControlPlane, req: Request) -> Response:
    """Route and run one request; never raises."""
    allowed_methods = []
    for method, pattern, auth, handler in ROUTES:
        m = pattern.match(req.path)
        if not m:
            continue
        if method != req.method:
            allowed_methods.append(method)
            continue
        route = pattern.pattern
        if not _authorized(auth, req.peer) or (req.peer_expired and handler is not h_renew):
            if req.peer_expired:
                reason = "expired"  # within the renewal grace, an expired certificate may only renew
            else:
                reason = "bootstrap-certificate" if req.peer is None else "not-authorized"
            REFUSED.labels(reason).inc()
            REQUESTS.labels(route, "403").inc()
            log_event(
                log,
                "api-refused",
                level=logging.WARNING,
                reason=reason,
                path=req.path,
                peer=str(req.peer),
                source=req.source,
            )
            message = (
                "certificate expired: only POST /v1/renew is allowed (renewal grace)"
                if req.peer_expired
                else "this call needs other credentials"
            )
            return Response(403, {"error": {"code": reason, "message": message}})
        try:
            resp = handler(cp, req, m)
        except TapproofError as exc:
            status, code = status_for(exc)
            REFUSED.labels(code).inc()
            log_event(
                log,
                "api-error",
                level=logging.WARNING if status < 500 else logging.ERROR,
                reason=code,
                path=req.path,
                peer=str(req.peer),
                source=req.source,
                detail=str(exc),
            )
            if status == 503:
                resp = _unavailable_response()
            else:
                # 5xx details (database errors, paths) stay in the log; the peer gets the code only
                message = str(exc) if status < 500 else "the control plane cannot serve this now; see its log"
                resp = Response(status, {"error": {"code": code, "message": message}})
        except Exception:
            log.exception("api-internal-error", extra={"event": "api-internal-error", "path": req.path})
            resp = Response(500, {"error": {"code": "internal", "message": "internal error (see server log)"}})
        REQUESTS.labels(route, str(resp.status)).inc()
        return resp
    if allowed_methods:
        return Response(
            405,
            {"error": {"code": "method-not-allowed", "message": f"use {', '.join(allowed_methods)}"}},
            (("Allow", ", ".join(allowed_methods)),),
        )
    REQUESTS.labels("unknown", "404").inc()
    return Response(404, {"error": {"code": "not-found", "message": f"no route {req.path}"}})
