"""Test infrastructure of the mesh in one place, as ``trio.testing``; must not import client.

What tests, the demo, the benches, the mesh engine and the chaos harness use
to stand up a mesh they can hurt:

* real broker processes on free loopback ports: ``MosquittoProcess`` and
  ``NatsServerProcess`` (with ``MosquittoTls``/``NatsTls`` to run them as
  ``deploy/`` configures them), ``NatsClusterProcess``, three clustered
  nats-servers whose nodes a test can kill and restart, and
  ``NatsSuperclusterProcess``, the clusters of ``deploy/nats/supercluster/``
  joined by gateways;
* a throwaway PKI (``TestPki``) and the ``deploy/`` access rules rendered for
  test brokers (``mosquitto_acl``, ``nats_accounts``), so tests run the very
  rules an operator copies;
* ``FaultyProxy``, a loopback TCP proxy that resets, partitions and delays
  connections;
* the tier fakes of ``fedtier.tiers.testing`` (``SimDevice``,
  ``RecordingMetrics``, ``sign_model_version``, ``sign_partial``), re-exported
  so a test needs one import for all of it. They live in ``tiers``, so a
  process that must stay lean (the measured bench worker) takes them without
  the broker launchers.

``python -m fedtier.simulations.testing.check`` names the broker binaries these
launchers will run, or the one missing.
"""

from __future__ import annotations

from fedtier.simulations.testing._deploy_templates import (
    DEPLOY_DIR,
    EXAMPLE_FLEET,
    EXAMPLE_NKEYS,
    EXAMPLE_REGION,
    MOSQUITTO_ACL_TEMPLATE,
    NATS_ACCOUNTS_TEMPLATE,
    NATS_CONF_TEMPLATE,
    inbox_prefix,
    mosquitto_acl,
    nats_accounts,
)
from fedtier.simulations.testing._mosquitto import (
    MALLOC_ENV,
    MosquittoProcess,
    MosquittoTls,
    find_mosquitto,
)
from fedtier.simulations.testing._nats_cluster import NatsClusterProcess
from fedtier.simulations.testing._nats_server import (
    MIN_NATS_SERVER_VERSION,
    NatsServerProcess,
    NatsTls,
    find_nats_server,
)
from fedtier.simulations.testing._nats_supercluster import NatsSuperclusterProcess
from fedtier.simulations.testing._pki import CertFiles, NkeyUser, TestPki
from fedtier.simulations.testing._ports import free_port
from fedtier.simulations.testing._proxy import LOOPBACK, FaultyProxy
from fedtier.tiers.testing import RecordingMetrics, SimDevice, sign_model_version, sign_partial

__all__ = [
    "DEPLOY_DIR",
    "EXAMPLE_FLEET",
    "EXAMPLE_NKEYS",
    "EXAMPLE_REGION",
    "LOOPBACK",
    "MALLOC_ENV",
    "MIN_NATS_SERVER_VERSION",
    "MOSQUITTO_ACL_TEMPLATE",
    "NATS_ACCOUNTS_TEMPLATE",
    "NATS_CONF_TEMPLATE",
    "CertFiles",
    "FaultyProxy",
    "MosquittoProcess",
    "MosquittoTls",
    "NatsClusterProcess",
    "NatsServerProcess",
    "NatsSuperclusterProcess",
    "NatsTls",
    "NkeyUser",
    "RecordingMetrics",
    "SimDevice",
    "TestPki",
    "find_mosquitto",
    "find_nats_server",
    "free_port",
    "inbox_prefix",
    "mosquitto_acl",
    "nats_accounts",
    "sign_model_version",
    "sign_partial",
]
