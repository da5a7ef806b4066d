"""``python -m simulations.sim ...`` is ``fedtier sim ...``; imports only the sim command."""

from __future__ import annotations

from fedtier.simulations.sim.cli import main

raise SystemExit(main())
