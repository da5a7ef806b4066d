"""``python -m fedtier.simulations.attack``: the ``fedtier sim attack`` command; imports only it."""

from fedtier.simulations.attack._cli import main

raise SystemExit(main())
