"""tapproof: encrypt every server-to-server link with post-quantum mutual TLS 1.3, and prove it."""

__version__ = "0.1.0"
__all__ = ["__version__"]
