"""``python -m fedtier.simulations.chaos``: the ``fedtier sim chaos`` command; imports only it."""

from fedtier.simulations.chaos._cli import main

raise SystemExit(main())
