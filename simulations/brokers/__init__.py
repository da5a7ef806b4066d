"""Starting and stopping real broker processes (Mosquitto, nats-server) for tests, demo, benches."""
