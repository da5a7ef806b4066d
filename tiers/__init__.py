"""Tier daemons and their math; imports protocol, never client or simulations."""
