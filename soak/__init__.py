"""The soak: real agents under steady load for DURATION, through renewals, a CA rotation and an agent kill.

``python -m soak --duration 10m`` (``make soak``/``make soak-run``); results in
``bench/results/soak.{json,md}``. See :mod:`soak.scenario`.
"""
