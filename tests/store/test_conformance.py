"""Run the store conformance suite on SQLite and on PostgreSQL (``store`` fixture in conftest)."""

from tests.store.conformance import *  # noqa: F403
