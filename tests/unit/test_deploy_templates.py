"""The deploy/ broker examples as templates, and the test PKI's nkeys; files only, no brokers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nkeys  # type: ignore[import-untyped]  # ships no type information
import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing import (
    EXAMPLE_NKEYS,
    MOSQUITTO_ACL_TEMPLATE,
    NATS_ACCOUNTS_TEMPLATE,
    MosquittoTls,
    TestPki,
    mosquitto_acl,
    nats_accounts,
)
from fedtier.simulations.testing._mosquitto import _render_config


def rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_rendered_acl_keeps_the_device_rules_and_copies_the_edge_rules() -> None:
    deployed = rules(MOSQUITTO_ACL_TEMPLATE.read_text())
    rendered = rules(mosquitto_acl(["edge-x", "edge-y"]))
    patterns = [line for line in deployed if line.startswith("pattern ")]
    assert patterns == [line for line in rendered if line.startswith("pattern ")]
    assert "pattern write ft/+/+/up/%u" in patterns
    after = deployed[deployed.index("user edge-site-a-1") + 1 :]
    edge_rules = after[: next(i for i, line in enumerate(after) if not line.startswith("topic "))]
    assert "topic read ft/+/+/up/+" in edge_rules
    count = 2 * (len(edge_rules) + 1)
    assert rendered[-count:] == ["user edge-x", *edge_rules, "user edge-y", *edge_rules]


def test_the_acl_template_refuses_an_odd_user_name() -> None:
    with pytest.raises(ConfigError, match="certificate CN"):
        mosquitto_acl(["edge x"])


def test_the_test_broker_listeners_match_the_deployed_listeners(tmp_path: Path) -> None:
    tls = MosquittoTls(
        tmp_path / "ca.pem",
        tmp_path / "b.pem",
        tmp_path / "b.key",
        tmp_path / "acl",
        tier_ca_file=tmp_path / "tier-ca.pem",
    )
    rendered = _render_config(
        tmp_path, 1883, autosave_interval=1, autosave_on_changes=False, tls=tls, tier_port=1884
    )
    settings = (
        "per_listener_settings",
        "tls_version",
        "require_certificate",
        "use_identity_as_username",
        "use_username_as_clientid",
        "allow_anonymous",
    )

    def blocks(text: str) -> list[list[str]]:
        """The security settings before the first listener, then per listener."""
        found: list[list[str]] = [[]]
        for line in rules(text):
            if line.startswith("listener "):
                found.append([])
            elif line.startswith(settings):
                found[-1].append(line)
        return found

    deployed = blocks((MOSQUITTO_ACL_TEMPLATE.parent / "mosquitto.conf").read_text())
    # Global, device listener, tier listener; the loopback health listener is not rendered.
    assert blocks(rendered) == deployed[:3]
    assert "use_username_as_clientid true" in deployed[1]
    assert "use_username_as_clientid true" not in deployed[2]


def test_nats_accounts_replace_every_example_key_fleet_and_region() -> None:
    keys = {role: f"U{role.upper()[0] * 55}" for role in EXAMPLE_NKEYS}
    block = nats_accounts(keys, fleet="acme", region="south")
    assert block.startswith("accounts {")
    assert block.rstrip().endswith("system_account: SYS")
    assert not any(example in block for example in EXAMPLE_NKEYS.values())
    assert all(f"nkey: {key}" in block for key in keys.values())
    assert not re.search("fleet1|FLEET1|eu-west", block)
    assert '"ft.acme.up.region.south"' in block
    assert '"$JS.API.CONSUMER.CREATE.FT_ACME_UP.regional-south.ft.acme.up.region.south"' in block
    assert '"$KV.ft_acme_models.>"' in block
    # Everything around the block stays in the deployed file only.
    assert "jetstream {\n      max_file" in block
    assert "sync_interval" not in block


def test_nats_accounts_need_every_role() -> None:
    keys = {role: f"U{'A' * 55}" for role in EXAMPLE_NKEYS if role != "operator"}
    with pytest.raises(ConfigError, match="roles"):
        nats_accounts(keys)


def test_nats_accounts_fail_loudly_when_the_template_drops_an_example_key(tmp_path: Path) -> None:
    template = tmp_path / "accounts.conf"
    text = NATS_ACCOUNTS_TEMPLATE.read_text().replace(EXAMPLE_NKEYS["regional"], "U" + "B" * 55)
    template.write_text(text)
    keys = {role: f"U{'A' * 55}" for role in EXAMPLE_NKEYS}
    with pytest.raises(ConfigError, match="example regional nkey"):
        nats_accounts(keys, template=template)


def test_pki_nkeys_are_what_the_nkeys_package_reads(tmp_path: Path) -> None:
    user = TestPki.create(tmp_path).issue_nkey_user("edge")
    pair = nkeys.from_seed(user.seed_file.read_bytes().strip())
    assert pair.public_key.decode() == user.public_key
    assert os.stat(user.seed_file).st_mode & 0o777 == 0o600


def test_pki_keys_are_private_and_names_are_checked(tmp_path: Path) -> None:
    pki = TestPki.create(tmp_path)
    client = pki.issue_client("abcdefghijklmnopqrstuvwx")
    assert os.stat(client.key_file).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "ca.key").st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError):
        pki.issue_client("../escape")
