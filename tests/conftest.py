"""Fixtures shared by every test folder: real broker processes and a fast hypothesis profile."""

from __future__ import annotations

import os

# One compute thread for torch, OpenBLAS and OpenMP, in this process and every
# process a test starts (they inherit the environment), set before any of them
# is imported. The suite runs beside other jobs on two cores: a second thread
# that spin-waits for a busy core made a tiny model's training steps up to 20
# times slower, and no test needs more than one thread. (The simulator and the
# lab's fleet already train with one; the device SDK leaves it to its caller.)
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from hypothesis import settings  # noqa: E402  (after the thread settings above)

from tests.conformance import FACTORY_MODULES  # noqa: E402

pytest_plugins = [
    "tests.plugins.mosquitto_fixtures",
    "tests.plugins.nats_fixtures",
    *(f"tests.conformance.{name}" for name in FACTORY_MODULES),
]

settings.register_profile("fedtier", max_examples=100, deadline=None)
settings.load_profile("fedtier")
