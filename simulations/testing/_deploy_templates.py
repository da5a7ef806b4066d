"""Access rules of ``deploy/`` rendered for test and demo brokers; must not import tiers or client.

The production examples are the templates: a test broker runs the very
rules an operator copies, so a rule the tests exercise cannot drift from
the one deployed. Only what is site-specific is replaced:

* ``deploy/mosquitto/acl``: the device ``pattern`` rules are kept verbatim;
  the edge daemons' ``user`` blocks are rewritten for the given edge names,
  each with the topic rules of the example edge (all example edges must
  have the same rules).
* ``deploy/nats/accounts.conf`` (the users every NATS topology includes):
  its ``accounts { ... }`` block and ``system_account`` line are kept, with
  the example nkeys replaced by the given users' public keys, and the example
  fleet (``fleet1``) and region (``eu-west``) by the given ones. One region:
  the example has one edge and one regional user. The site leaf node's user
  stays only when its key is given: a lone test server has no leaf nodes.

Needs a source checkout (``deploy/`` is not packaged); a missing or changed
template raises ``ConfigError`` naming what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import ConfigError
from fedtier.protocol.names import check_token

__all__ = [
    "DEPLOY_DIR",
    "EXAMPLE_FLEET",
    "EXAMPLE_NKEYS",
    "EXAMPLE_REGION",
    "MOSQUITTO_ACL_TEMPLATE",
    "NATS_ACCOUNTS_TEMPLATE",
    "NATS_CONF_TEMPLATE",
    "SITE_EXAMPLE_NKEY",
    "inbox_prefix",
    "mosquitto_acl",
    "nats_accounts",
]

DEPLOY_DIR: Final = Path(__file__).resolve().parents[2] / "deploy"
MOSQUITTO_ACL_TEMPLATE: Final = DEPLOY_DIR / "mosquitto" / "acl"
NATS_CONF_TEMPLATE: Final = DEPLOY_DIR / "nats" / "nats-server.conf"
NATS_ACCOUNTS_TEMPLATE: Final = DEPLOY_DIR / "nats" / "accounts.conf"

EXAMPLE_FLEET: Final = "fleet1"
EXAMPLE_REGION: Final = "eu-west"
EXAMPLE_NKEYS: Final[Mapping[str, str]] = {
    # role -> the example public key deploy/nats/accounts.conf lists for it
    "edge": "UAJ537LS3TDVZIHYIAUDI7M4VZDBNKVH4ZMXOIKJBGAE672L7W6WB3OO",
    "regional": "UBGVZH4JU5AFNIFCFPZPFTPDNAGT644KBXLKJUUS7AGNT7GWLDJF3SHV",
    "central": "UB2BGPQP7L2GEKELSELQ7ELEELHJU54WZKYJZ3LHGBHUDEGBJQOQBYCE",
    "operator": "UDF3T6P5M5CO3MZPCMOQ5QZ2R5DUC242ZBYTCOGCRTR4XAXNYKLTNXBV",
    "status": "UDKQL6MYGNRNK6HW6HMO5PKZQGIVWDV26S25T7GQOQQXWJB3DKZ5SOWZ",
}
# The example public key of the site leaf node's user in deploy/nats/accounts.conf
# (role "site"; optional, unlike the roles of EXAMPLE_NKEYS).
SITE_EXAMPLE_NKEY: Final = "UBXSYEP5UOKEINRDGWARZHC5NTSFS5JAJSU63EIYBHYQEL4TB5RAOGKE"
# The comment lines around the site user's entry, where the renderer cuts it out.
_SITE_BEGIN: Final = re.compile(r"^[ \t]*# --- site leaf node of .*\n", re.MULTILINE)
_SITE_END: Final = re.compile(r"^[ \t]*# --- end of the site leaf node of .*\n", re.MULTILINE)

_USER_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NKEY_RE: Final = re.compile(r"U[A-Z2-7]{55}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the broker template {path} ({exc}); it ships with a source checkout"
        ) from exc


def mosquitto_acl(edge_users: Sequence[str], *, template: Path = MOSQUITTO_ACL_TEMPLATE) -> str:
    """Return ``deploy/mosquitto/acl`` with its edge ``user`` blocks made for ``edge_users``.

    Args:
        edge_users: user names of the edge daemons (their certificates' CN).
        template: the ACL to start from.

    Raises:
        ConfigError: a bad user name, or a template without edge users or
            whose edge users differ in their rules.
    """
    for user in edge_users:
        if _USER_RE.fullmatch(user) is None:
            raise ConfigError(f"edge user name {user!r} is not a plain certificate CN")
    kept: list[str] = []
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in _read(template).splitlines():
        stripped = line.strip()
        if stripped.startswith("user "):
            current = []
            blocks.append(current)
        elif current is not None and stripped.startswith("topic "):
            current.append(stripped)
        else:
            current = None
            kept.append(line)
    if not blocks or not blocks[0]:
        raise ConfigError(f"{template} has no edge 'user' block with 'topic' rules to copy")
    if any(block != blocks[0] for block in blocks):
        raise ConfigError(f"the edge 'user' blocks of {template} differ; make them equal")
    while kept and not kept[-1].strip():
        kept.pop()
    lines = [*kept, ""]
    for user in edge_users:
        lines += [f"user {user}", *blocks[0], ""]
    return "\n".join(lines)


def inbox_prefix(role: str, region: str = EXAMPLE_REGION) -> str:
    """The reply inbox prefix a user of ``role`` may subscribe to under the deployed rules.

    deploy/nats/accounts.conf gives each user its own (``_INBOX_edge_<region>``,
    ``_INBOX_regional_<region>``, ``_INBOX_central``, ``_INBOX_status``; the
    operator of the SYS account keeps ``_INBOX``); a daemon sets its own with
    ``[nats] inbox_prefix``.
    """
    prefixes = {
        "edge": f"_INBOX_edge_{region}",
        "regional": f"_INBOX_regional_{region}",
        "central": "_INBOX_central",
        "status": "_INBOX_status",
        "operator": "_INBOX",
    }
    if role not in prefixes:
        raise ConfigError(f"no inbox prefix for NATS role {role!r}; roles: {sorted(prefixes)}")
    return prefixes[role]


def nats_accounts(
    public_keys: Mapping[str, str],
    *,
    fleet: str = EXAMPLE_FLEET,
    region: str = EXAMPLE_REGION,
    template: Path = NATS_ACCOUNTS_TEMPLATE,
) -> str:
    """Return the ``accounts`` block and ``system_account`` line of the NATS example.

    Args:
        public_keys: role (``edge``, ``regional``, ``central``, ``operator``,
            ``status``, and optionally ``site``) -> the public nkey (``U...``)
            that replaces the example one. Without ``site`` the site leaf
            node's user is left out.
        fleet: the fleet token replacing ``fleet1`` (and ``FLEET1`` in stream names).
        region: the region token replacing ``eu-west``.
        template: the file to take the block from.

    Raises:
        ConfigError: a role missing or unknown, a key that is not a user
            nkey, or a template without the block, an example key or the
            site user's marker comments.
    """
    examples = {**EXAMPLE_NKEYS, "site": SITE_EXAMPLE_NKEY}
    if not set(EXAMPLE_NKEYS) <= set(public_keys) <= set(examples):
        raise ConfigError(
            f"NATS users must be given for exactly the roles {sorted(EXAMPLE_NKEYS)}"
            f" (and optionally 'site'), got {sorted(public_keys)}"
        )
    for role, key in public_keys.items():
        if _NKEY_RE.fullmatch(key) is None:
            raise ConfigError(f"the {role} key {key[:12]!r}... is not a public user nkey (U...)")
    check_token("fleet", fleet)
    check_token("region", region)
    text = _read(template)
    start = re.search(r"^accounts\s*\{", text, re.MULTILINE)
    system = re.search(r"^system_account:.*$", text, re.MULTILINE)
    if start is None or system is None:
        raise ConfigError(f"{template} has no top-level 'accounts {{' block or 'system_account'")
    block = text[start.start() : _block_end(text, start.end(), template)] + "\n" + system[0]
    for role, example in examples.items():
        if example not in block:
            raise ConfigError(
                f"{template} no longer lists the example {role} nkey {example}; update"
                " EXAMPLE_NKEYS or SITE_EXAMPLE_NKEY in simulations/testing/_deploy_templates.py"
            )
    if "site" not in public_keys:
        block = _without_site_user(block, template)
    for role, key in public_keys.items():
        block = block.replace(examples[role], key)
    # Word boundaries: "fleet1" inside ft.fleet1.up / ft_fleet1_models /
    # FT_FLEET1_UP is the fleet; nothing else in the block contains it.
    block = re.sub(rf"(?<![A-Za-z0-9]){EXAMPLE_FLEET}(?![A-Za-z0-9])", fleet, block)
    block = re.sub(rf"(?<![A-Za-z0-9]){EXAMPLE_FLEET.upper()}(?![A-Za-z0-9])", fleet.upper(), block)
    # "eu-west" also ends the consumer name "regional-eu-west": a '-' may precede it.
    return re.sub(rf"(?<![A-Za-z0-9]){EXAMPLE_REGION}(?![A-Za-z0-9_-])", region, block)


def _without_site_user(block: str, template: Path) -> str:
    """``block`` without the lines from the site user's begin marker to its end marker."""
    begin = _SITE_BEGIN.search(block)
    end = _SITE_END.search(block)
    if begin is None or end is None or end.start() < begin.end():
        raise ConfigError(
            f"{template} no longer marks the site leaf node's user with '# --- site leaf"
            " node of ...' and '# --- end of the site leaf node of ...' lines"
        )
    cut = block[: begin.start()] + block[end.end() :]
    if SITE_EXAMPLE_NKEY in cut:
        raise ConfigError(f"the site leaf node's user of {template} lies outside its markers")
    return cut


def _block_end(text: str, after_open: int, template: Path) -> int:
    """Return the index just past the ``}`` closing the block opened before ``after_open``."""
    depth = 1
    i = after_open
    in_string: str | None = None
    while i < len(text):
        char = text[i]
        if in_string is not None:
            if char == in_string:
                in_string = None
        elif char == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        elif char in "\"'":
            in_string = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ConfigError(f"the 'accounts' block of {template} is not closed")
