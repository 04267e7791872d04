"""Certificate signing requests: built on the agent (the key never leaves it), checked on the server.

The server takes nothing from a CSR but its public key: the identity comes
from the join token or the client certificate. A CSR that asks for another
identity is refused rather than silently corrected, so a confused or hostile
agent is visible in the logs.
"""

from __future__ import annotations

from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from tapproof.errors import CSRReason, CSRRejected
from tapproof.identity import SpiffeID
from tapproof.pki.certs import PublicKey
from tapproof.pki.keys import PrivateKey, signing_hash

MAX_CSR_BYTES = 16 * 1024
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


def build(key: PrivateKey, spiffe_id: SpiffeID | None) -> bytes:
    """A PEM CSR for ``key``, asking for ``spiffe_id`` (or no identity) in its URI SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tapproof")])
    )
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
    csr = builder.sign(key, cast("Any", signing_hash(key)))
    return csr.public_bytes(serialization.Encoding.PEM)


def check(pem: bytes | str, expected: SpiffeID) -> PublicKey:
    """Validate a CSR for ``expected``; return its public key or raise :class:`CSRRejected`."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected(CSRReason.MALFORMED, f"csr larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CSRRejected(CSRReason.MALFORMED, "not a PEM certificate signing request") from exc
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # unsupported or malformed key (found by fuzz/)
        raise CSRRejected(CSRReason.WEAK_KEY, "unsupported public key") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise CSRRejected(CSRReason.WEAK_KEY, f"curve {key.curve.name} is not P-256 or P-384")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CSRRejected(
            CSRReason.WEAK_KEY,
            f"{type(key).__name__.lstrip('_')} keys are refused: use ECDSA P-256 or Ed25519",
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CSRRejected(CSRReason.BAD_SIGNATURE, "csr signature cannot be checked") from exc
    if not valid:
        raise CSRRejected(CSRReason.BAD_SIGNATURE, "csr signature does not verify (tampered?)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return key
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CSRRejected(CSRReason.MALFORMED, "csr extensions do not parse") from exc
    asked = [str(n.value) for n in san]
    if asked != [str(expected)]:
        raise CSRRejected(
            CSRReason.IDENTITY_MISMATCH,
            f"csr asks for {', '.join(asked) or 'nothing'}, token is for {expected}",
        )
    return key


def public_key_der(pem: bytes | str) -> bytes:
    """The SubjectPublicKeyInfo DER of a CSR's key (signature not checked: :func:`check` does that)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected(CSRReason.MALFORMED, f"csr larger than {MAX_CSR_BYTES} bytes")
    try:
        key = x509.load_pem_x509_csr(data).public_key()
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CSRRejected(CSRReason.MALFORMED, "not a PEM certificate signing request") from exc
