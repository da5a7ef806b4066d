"""The fedtier wire contract, sans-IO.

Imports numpy, msgpack, cryptography and blake3, never trio, sockets or a clock.

``protocol.bus`` is the one subpackage allowed to do I/O (trio, paho, nats-py).
"""
