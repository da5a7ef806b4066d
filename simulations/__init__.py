"""Fleet scenarios, simulator, demo, benchmarks and the ``fedtier`` command; may import all."""
