"""``python -m fedtier``: the ``fedtier`` command; imports only ``fedtier.cli``."""

from __future__ import annotations

from fedtier.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
