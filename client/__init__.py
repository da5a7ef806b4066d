"""The device SDK; imports protocol, never tiers or simulations."""
