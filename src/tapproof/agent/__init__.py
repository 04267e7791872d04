"""The agent: enrollment, credentials and renewal, and (``agent run``) the tunnels."""
