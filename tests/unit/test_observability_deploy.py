"""deploy/observability/: the alert rules pass promtool and their unit tests, and the rules and
the Grafana dashboard use only series fedtier exports, with runbooks that exist."""

from __future__ import annotations

import collections.abc
import inspect
import json
import re
import subprocess
import sys
import typing
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedtier.protocol.telemetry import metrics as metrics_module
from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "observability"
RULES = DEPLOY / "fedtier-alerts.yml"
RULE_TESTS = DEPLOY / "fedtier-alerts.test.yml"
PROMETHEUS = DEPLOY / "prometheus.example.yml"
DASHBOARD = DEPLOY / "fedtier-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Series Prometheus makes itself, not fedtier: `up` (one per scrape target).
PROMETHEUS_OWN = frozenset({"up"})


def promtool() -> Path:
    """Debian's promtool, which `make test-tools` puts next to the venv's python."""
    for candidate in (
        Path(sys.executable).parent / "promtool",
        ROOT / ".venv" / "bin" / "promtool",
    ):
        if candidate.is_file():
            return candidate
    pytest.fail("promtool is missing: run `make test-tools` (it extracts Debian's promtool)")


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [str(promtool()), *args],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_the_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", RULES.name)


def test_every_alert_rule_passes_its_promtool_unit_tests() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS.name)


def test_the_example_prometheus_config_is_valid() -> None:
    output = run_promtool("check", "config", PROMETHEUS.name)
    assert "is valid prometheus config file syntax" in output
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [RULES.name]
    # FedtierDaemonDown matches `up` of this job.
    assert [job["job_name"] for job in config["scrape_configs"]] == ["fedtier"]


# -- what the files say ---------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def dashboard_queries() -> list[str]:
    data = dashboard()
    queries = [
        target["expr"]
        for panel in all_panels(data["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


@cache
def exported() -> tuple[frozenset[str], frozenset[str]]:
    """The series names and label names fedtier's metrics endpoint serves.

    Every public recording method of ``TierMetrics`` is called once (arguments
    made from its type hints) and the endpoint is scraped: the names come from
    the code, so a series renamed there fails the dashboard and the rules here.
    """
    samples = {
        int: 1,
        float: 1.0,
        str: "x",
        bool: True,
    }
    with setup_metrics(prometheus_port=0, set_global=False) as handle:
        metrics = TierMetrics("edge", "edge-1", meter_provider=handle.meter_provider)
        called = 0
        for name, method in inspect.getmembers(metrics, inspect.ismethod):
            if name.startswith("_"):
                continue
            hints = typing.get_type_hints(method)
            args: list[Any] = []
            for parameter in inspect.signature(method).parameters.values():
                if parameter.default is not inspect.Parameter.empty:
                    continue
                hint = hints[parameter.name]
                if typing.get_origin(hint) is collections.abc.Mapping:
                    args.append({"x": 1})
                else:
                    args.append(samples[hint])
            method(*args)
            called += 1
        assert called >= 20  # the docstring table's series, operational ones included
        body = urllib.request.urlopen(f"http://127.0.0.1:{handle.port}/metrics", timeout=10).read()
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return frozenset(names), frozenset(labels)


_NAME = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")
# PromQL words that look like names: functions, keywords, aggregations.
_NOT_SERIES = re.compile(
    r"^(sum|min|max|avg|count|rate|increase|irate|delta|deriv|time|histogram_quantile|"
    r"label_values|by|without|on|ignoring|group_left|group_right|offset|and|or|unless|"
    r"bool|le|inf|Inf|nan)$"
)


def series_in(expr: str) -> set[str]:
    """The fedtier series names ``expr`` reads (label names and strings left out)."""
    _, label_names = exported()
    # Drop quoted strings and $variables; what remains of a name is a series, a label or a word.
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\$\w+", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    return {
        name
        for name in _NAME.findall(bare)
        if name.startswith("fedtier_") and name not in label_names and not _NOT_SERIES.match(name)
    }


def test_the_rules_and_the_dashboard_read_only_series_fedtier_exports() -> None:
    names, _ = exported()
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used[f"alert {rule['alert']}"] = series_in(rule["expr"])
        assert series_in(rule["expr"]) or "up{" in rule["expr"], rule["alert"]
    for query in dashboard_queries():
        used[f"dashboard: {query}"] = series_in(query)
    unknown = {where: sorted(found - names) for where, found in used.items() if found - names}
    assert not unknown, f"series fedtier does not export: {unknown}"
    # Prometheus's own series aside, nothing else is read.
    others = {
        word
        for query in [*dashboard_queries(), *(rule["expr"] for rule in alert_rules())]
        for word in re.findall(r"\b([a-z_]+)\{", re.sub(r'"[^"]*"', "", query))
        if not word.startswith("fedtier_")
    }
    assert others <= PROMETHEUS_OWN


def test_the_name_check_would_catch_a_wrong_name() -> None:
    names, _ = exported()
    found = series_in('sum by (fedtier_instance) (rate(fedtier_updates_totl{tier="edge"}[5m]))')
    assert found == {"fedtier_updates_totl"}
    assert not found <= names
    assert "fedtier_updates_total" in names
    assert "fedtier_outbox_oldest_age_seconds" in names


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (code blocks left out)."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            text = re.sub(r"[`*]", "", match.group(1)).lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_for_a_severity_and_a_runbook_that_exists() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    rules = alert_rules()
    assert len(rules) >= 15
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for`"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        doc, _, anchor = annotations["runbook"].partition("#")
        assert doc == "docs/operations.md", name
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    assert yaml.safe_load(RULE_TESTS.read_text())["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        assert case["input_series"], case["name"]
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts no test fires"
    assert names - quiet == set(), "alerts no test shows quiet"


def test_the_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["schemaVersion"] >= 39
    assert data["uid"]
    assert data["title"]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("fleet", "tier", "instance"):
        assert variables[name]["type"] == "query"
        # "All" must also match series without the label (a scrape config without `fleet`).
        assert variables[name]["allValue"] == ".*"
    panels = all_panels(data["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # No two panels overlap.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_dashboard_shows_what_a_region_needs() -> None:
    used = set().union(*(series_in(query) for query in dashboard_queries()))
    for series in (
        "fedtier_active_devices",
        "fedtier_updates_total",
        "fedtier_quarantined_inputs",
        "fedtier_staleness_versions_bucket",
        "fedtier_model_version_created_seconds",
        "fedtier_buffer_inputs",
        "fedtier_buffer_flush_inputs",
        "fedtier_outbox_oldest_age_seconds",
        "fedtier_outbox_partials",
        "fedtier_jetstream_consumer_pending",
        "fedtier_mqtt_broker_dropped_messages",
        "fedtier_nats_sync_always",
        "fedtier_state_disk_watermark",
        "fedtier_model_metric",
    ):
        assert series in used, series


def test_every_exported_series_is_in_the_metrics_docstring_table() -> None:
    table = metrics_module.__doc__ or ""
    names, _ = exported()
    missing = set()
    for name in names:
        if not name.startswith("fedtier_"):
            continue
        base = re.sub(r"_(bucket|sum|count|created)$", "", name)
        if re.search(rf"\b{re.escape(name)}\b", table) is None and base not in table:
            missing.add(name)
    assert not missing, f"protocol/telemetry/metrics.py's docstring does not list {missing}"
