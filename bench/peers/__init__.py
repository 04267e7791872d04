"""The side-by-side benchmark (issue 5): tapproof against plaintext, stunnel, spiped, socat and haproxy.

Entry: ``python -m bench peers`` (the default of ``python -m bench`` and ``make bench``);
see bench/README.md.
"""
