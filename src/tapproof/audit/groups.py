"""TLS registries: named groups (with a post-quantum flag) and cipher suites.

Codes from the IANA "TLS Supported Groups" and "TLS Cipher Suites" registries
and draft-ietf-tls-ecdhe-mlkem / draft-tls-westerbaan-xyber768d00.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CipherSuite",
    "Group",
    "cipher_suite",
    "group",
    "tls_version_name",
]


@dataclass(frozen=True, slots=True)
class Group:
    """A TLS named group: ``code``, ``name``, and whether it resists a quantum computer."""

    code: int
    name: str
    pq: bool


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """A TLS cipher suite with the properties the verdict needs."""

    code: int
    name: str
    kx: str  # "tls13" | "ECDHE" | "DHE" | "RSA" | "PSK" | "anon" | "unknown"
    aead: bool
    broken: bool  # NULL, export, RC4, single DES, anonymous


_GROUPS: dict[int, tuple[str, bool]] = {
    0x0017: ("secp256r1", False),
    0x0018: ("secp384r1", False),
    0x0019: ("secp521r1", False),
    0x001D: ("x25519", False),
    0x001E: ("x448", False),
    0x001F: ("brainpoolP256r1tls13", False),
    0x0020: ("brainpoolP384r1tls13", False),
    0x0021: ("brainpoolP512r1tls13", False),
    0x0100: ("ffdhe2048", False),
    0x0101: ("ffdhe3072", False),
    0x0102: ("ffdhe4096", False),
    0x0103: ("ffdhe6144", False),
    0x0104: ("ffdhe8192", False),
    0x0200: ("MLKEM512", True),
    0x0201: ("MLKEM768", True),
    0x0202: ("MLKEM1024", True),
    0x11EB: ("SecP256r1MLKEM768", True),
    0x11EC: ("X25519MLKEM768", True),
    0x11ED: ("SecP384r1MLKEM1024", True),
    0x6399: ("X25519Kyber768Draft00", True),
    0x639A: ("SecP256r1Kyber768Draft00", True),
}

# (name, kx, aead, broken)
_SUITES: dict[int, tuple[str, str, bool, bool]] = {
    0x0000: ("TLS_NULL_WITH_NULL_NULL", "unknown", False, True),
    0x0001: ("TLS_RSA_WITH_NULL_MD5", "RSA", False, True),
    0x0002: ("TLS_RSA_WITH_NULL_SHA", "RSA", False, True),
    0x0003: ("TLS_RSA_EXPORT_WITH_RC4_40_MD5", "RSA", False, True),
    0x0004: ("TLS_RSA_WITH_RC4_128_MD5", "RSA", False, True),
    0x0005: ("TLS_RSA_WITH_RC4_128_SHA", "RSA", False, True),
    0x0009: ("TLS_RSA_WITH_DES_CBC_SHA", "RSA", False, True),
    0x000A: ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", "RSA", False, False),
    0x0016: ("TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA", "DHE", False, False),
    0x0018: ("TLS_DH_anon_WITH_RC4_128_MD5", "anon", False, True),
    0x002F: ("TLS_RSA_WITH_AES_128_CBC_SHA", "RSA", False, False),
    0x0033: ("TLS_DHE_RSA_WITH_AES_128_CBC_SHA", "DHE", False, False),
    0x0034: ("TLS_DH_anon_WITH_AES_128_CBC_SHA", "anon", False, True),
    0x0035: ("TLS_RSA_WITH_AES_256_CBC_SHA", "RSA", False, False),
    0x0039: ("TLS_DHE_RSA_WITH_AES_256_CBC_SHA", "DHE", False, False),
    0x003B: ("TLS_RSA_WITH_NULL_SHA256", "RSA", False, True),
    0x003C: ("TLS_RSA_WITH_AES_128_CBC_SHA256", "RSA", False, False),
    0x003D: ("TLS_RSA_WITH_AES_256_CBC_SHA256", "RSA", False, False),
    0x0067: ("TLS_DHE_RSA_WITH_AES_128_CBC_SHA256", "DHE", False, False),
    0x006B: ("TLS_DHE_RSA_WITH_AES_256_CBC_SHA256", "DHE", False, False),
    0x009C: ("TLS_RSA_WITH_AES_128_GCM_SHA256", "RSA", True, False),
    0x009D: ("TLS_RSA_WITH_AES_256_GCM_SHA384", "RSA", True, False),
    0x009E: ("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE", True, False),
    0x009F: ("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE", True, False),
    0x00A6: ("TLS_DH_anon_WITH_AES_128_GCM_SHA256", "anon", True, True),
    0x1301: ("TLS_AES_128_GCM_SHA256", "tls13", True, False),
    0x1302: ("TLS_AES_256_GCM_SHA384", "tls13", True, False),
    0x1303: ("TLS_CHACHA20_POLY1305_SHA256", "tls13", True, False),
    0x1304: ("TLS_AES_128_CCM_SHA256", "tls13", True, False),
    0x1305: ("TLS_AES_128_CCM_8_SHA256", "tls13", True, False),
    0xC002: ("TLS_ECDH_ECDSA_WITH_RC4_128_SHA", "ECDH", False, True),
    0xC007: ("TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", "ECDHE", False, True),
    0xC009: ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "ECDHE", False, False),
    0xC00A: ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "ECDHE", False, False),
    0xC011: ("TLS_ECDHE_RSA_WITH_RC4_128_SHA", "ECDHE", False, True),
    0xC012: ("TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA", "ECDHE", False, False),
    0xC013: ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE", False, False),
    0xC014: ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE", False, False),
    0xC018: ("TLS_ECDH_anon_WITH_AES_128_CBC_SHA", "anon", False, True),
    0xC023: ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "ECDHE", False, False),
    0xC024: ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", "ECDHE", False, False),
    0xC027: ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "ECDHE", False, False),
    0xC028: ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", "ECDHE", False, False),
    0xC02B: ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE", True, False),
    0xC02C: ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE", True, False),
    0xC02F: ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE", True, False),
    0xC030: ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE", True, False),
    0xC0AC: ("TLS_ECDHE_ECDSA_WITH_AES_128_CCM", "ECDHE", True, False),
    0xC0AD: ("TLS_ECDHE_ECDSA_WITH_AES_256_CCM", "ECDHE", True, False),
    0xCCA8: ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE", True, False),
    0xCCA9: ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE", True, False),
    0xCCAA: ("TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "DHE", True, False),
}

_VERSIONS = {
    0x0200: "SSL 2.0",
    0x0300: "SSL 3.0",
    0x0301: "TLS 1.0",
    0x0302: "TLS 1.1",
    0x0303: "TLS 1.2",
    0x0304: "TLS 1.3",
}


def group(code: int) -> Group:
    """Describe a named group; unknown codes get ``0x....`` as name and ``pq=False``."""
    name, pq = _GROUPS.get(code, (f"0x{code:04X}", False))
    return Group(code, name, pq)


def cipher_suite(code: int) -> CipherSuite:
    """Describe a cipher suite; unknown codes are named ``0x....`` with unknown properties."""
    entry = _SUITES.get(code)
    if entry is None:
        return CipherSuite(code, f"0x{code:04X}", "unknown", False, False)
    name, kx, aead, broken = entry
    return CipherSuite(code, name, kx, aead, broken)


def tls_version_name(code: int) -> str:
    """``0x0304`` -> ``"TLS 1.3"``; draft or unknown versions as ``0x....``."""
    if (code >> 8) == 0x7F:  # TLS 1.3 drafts
        return f"TLS 1.3 draft {code & 0xFF}"
    return _VERSIONS.get(code, f"0x{code:04X}")
