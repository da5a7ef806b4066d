"""Pytest fixtures that start a real nats-server on a free loopback port."""
