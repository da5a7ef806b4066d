"""Fleet scenarios, the simulator, the demo, benchmarks and the ``fedtier`` command; may import every package."""
