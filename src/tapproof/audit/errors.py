"""The auditor's own error types, under the project tree in :mod:`tapproof.errors`.

::

    ConfigError
    └── AuditInputError        a capture we cannot use at all (missing, not a capture, bad flag)
        ├── UnknownLinkType    a link type we do not decode
        └── CaptureCorrupt     a capture that breaks part-way (truncated, bad block);
                               ``packets_read`` says how far it got, and the packets
                               before the break are still analysed and reported
    RemoteProtocolError
    └── TLSParseError          bytes inside a TCP stream that are not valid TLS
"""

from __future__ import annotations

from tapproof.errors import ConfigError, RemoteProtocolError

__all__ = ["AuditInputError", "CaptureCorrupt", "TLSParseError", "UnknownLinkType"]


class AuditInputError(ConfigError):
    """The auditor cannot use its input (CLI exit code 2)."""


class UnknownLinkType(AuditInputError):
    """The capture's link type is not one the auditor decodes."""

    def __init__(self, linktype: int, path: str = "") -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}unsupported link type {linktype}")
        self.linktype = linktype


class CaptureCorrupt(AuditInputError):
    """The capture breaks after ``packets_read`` packets (truncated or damaged)."""

    def __init__(self, detail: str, packets_read: int, path: str = "") -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{detail} after {packets_read} packets")
        self.detail = detail
        self.packets_read = packets_read
        self.path = path


class TLSParseError(RemoteProtocolError):
    """Bytes that do not parse as TLS records or handshake messages."""
