"""Atheris entry for the CONNECT preamble target (the logic is ``fuzz.targets.preamble``).

With atheris installed::

    python fuzz/fuzz_preamble.py -atheris_runs=100000

Without it, this runs the bounded random loop of ``fuzz.runner``; ``python -m fuzz``
runs every target that way.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.runner import run
from fuzz.targets import PREAMBLE_SEEDS, preamble

TestOneInput = preamble  # atheris's required name


def main(argv: list[str] | None = None) -> int:
    """Run under atheris if installed, else 10 s of the bounded loop."""
    args = sys.argv[1:] if argv is None else argv
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print(f"preamble: {run(preamble, PREAMBLE_SEEDS, seconds=10.0)} inputs, no crash")
        return 0
    atheris.Setup([sys.argv[0], *args], TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
