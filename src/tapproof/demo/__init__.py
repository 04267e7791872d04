"""``tapproof demo``: a recording tap between two datacenters, first without tapproof, then with it.

Modules: :mod:`~tapproof.demo.canary` (the service holding the secret and its
client), :mod:`~tapproof.demo.tap` (the userspace recording relay that writes a
real pcap), :mod:`~tapproof.demo.sites` (where processes run: loopback or a
network namespace), :mod:`~tapproof.demo.inspect` (what the tap read),
:mod:`~tapproof.demo.orchestrate` (the story, step by step, with cleanup) and
:mod:`~tapproof.demo.output` (the rich before/after table).
"""
