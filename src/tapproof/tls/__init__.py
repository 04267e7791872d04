"""TLS: pyOpenSSL contexts that only speak mutual TLS 1.3 with X25519MLKEM768, and peer checks.

pyOpenSSL runs on the OpenSSL bundled in the ``cryptography`` wheel (>= 3.5,
ML-KEM); the stdlib ``ssl`` module links the system OpenSSL, which may have
no ML-KEM, so tapproof never uses it for links.
"""
