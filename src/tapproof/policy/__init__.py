"""Policy: which identities may reach which services (and ports). Pure; see ``evaluate``."""

from tapproof.policy.model import Decision, Rule, evaluate, parse_ports, parse_source

__all__ = ["Decision", "Rule", "evaluate", "parse_ports", "parse_source"]
