"""The lab: scenarios, simulator, demo, benchmarks and their ``fedtier`` commands; imports any."""
