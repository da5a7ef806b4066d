"""Bus conformance suite; one ``factory_*.py`` module per transport."""

from __future__ import annotations

import pathlib

FACTORY_MODULES = sorted(p.stem for p in pathlib.Path(__file__).parent.glob("factory_*.py"))
