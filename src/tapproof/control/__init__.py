"""The control plane: CA, identities, enrollment, policy, revocation, and its HTTP+JSON API."""
