"""Pytest fixtures that start a real Mosquitto on a free loopback port."""
