"""PKI: keys, CSRs, the CA (root + intermediate), issuance and certificate checks (pure, no I/O but files)."""
