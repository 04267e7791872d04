"""Fuzz targets for every parser of untrusted bytes; ``python -m fuzz`` runs them all (bounded)."""
