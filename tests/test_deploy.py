"""The Prometheus kit in deploy/: rules, their unit tests, the example config and the dashboard.

promtool checks the rules and runs their unit tests (and a broken copy of the rules must fail
them). The rest keeps the kit true to the code: every metric name and every outcome or state the
rules and the dashboard select is one the real registry of `broker.metrics.Metrics` exports, and
every metric of the contract has a dashboard panel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.api.problems import OUTCOMES as PROBLEM_OUTCOMES
from broker.metrics import RECOVERY_OUTCOMES, GrantGauges, Metrics
from broker.model import GrantState
from broker.schedule import Outcome

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "token-broker.rules.yml"
RULE_TESTS = PROMETHEUS / "token-broker.rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS / "prometheus.example.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "token-broker.json"
PROMTOOL_TIMEOUT = 60.0  # seconds; promtool answers in well under one

# The metrics table of CONTRACT.md (the external contract, kept outside this repository):
# name -> (type, label names).
CONTRACT_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "token_broker_token_requests_total": ("counter", frozenset({"provider", "outcome"})),
    "token_broker_token_request_duration_seconds": ("histogram", frozenset()),
    "token_broker_refresh_total": ("counter", frozenset({"provider", "outcome"})),
    "token_broker_refresh_duration_seconds": ("histogram", frozenset({"provider"})),
    "token_broker_grants": ("gauge", frozenset({"provider", "state"})),
    "token_broker_access_token_min_ttl_seconds": ("gauge", frozenset({"provider"})),
    "token_broker_rotation_recoveries_total": ("counter", frozenset({"provider", "outcome"})),
    "token_broker_build_info": ("gauge", frozenset({"version"})),
    "token_broker_provider_paused": ("gauge", frozenset({"provider"})),
    "token_broker_store_commit_retries_total": ("counter", frozenset()),
    "token_broker_lease_takeovers_total": ("counter", frozenset({"provider"})),
    "token_broker_fleet_change_lag_seconds": ("histogram", frozenset()),
    "token_broker_store_up": ("gauge", frozenset()),
    "token_broker_sink_writes_total": ("counter", frozenset({"outcome"})),
}
# Labels whose values come from a fixed set in the code; provider values are the operator's.
CLOSED_LABELS = ("outcome", "state")
SEVERITIES = ("critical", "warning")

METRIC_NAME = re.compile(r"\btoken_broker_\w+")
SELECTOR = re.compile(r"\b(token_broker_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Grafana's variables, replaced by something PromQL accepts before promtool parses a panel query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$provider": ".*"}

Exposition = dict[str, dict[str, set[str]]]  # sample name -> label name -> values


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool binary; a skip when it is missing, or a failure under REQUIRE_TOOLS."""
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("TOKEN_BROKER_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason}; TOKEN_BROKER_REQUIRE_TOOLS=1 makes that a failure")
        pytest.skip(f"{reason}; set TOKEN_BROKER_REQUIRE_TOOLS=1 to fail instead")
    return path


@pytest.fixture(scope="module")
def exported() -> Exposition:
    """What the real registry of a broker with one provider exports, every grant state included."""
    metrics = Metrics(["techniek"])
    every_state = {("techniek", state.value): 1 for state in GrantState}
    metrics.watch_grants(lambda: GrantGauges(by_state=every_state, min_ttl={"techniek": 60.0}))
    samples: Exposition = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return samples


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run promtool in `cwd`, where the files it reads name each other by relative path."""
    return subprocess.run(
        [promtool, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


def assert_success(result: subprocess.CompletedProcess[str]) -> None:
    """promtool exited 0, said SUCCESS, and reported no failure or error."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in result.stdout, output
    assert "FAILED" not in output, output
    assert result.stderr.strip() == "", output


def load_rules() -> dict[str, Any]:
    """The rules file as data."""
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return rules


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rules file."""
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def rule_expressions() -> list[str]:
    """The PromQL of every rule, alerting or recording."""
    return [str(rule["expr"]) for group in load_rules()["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    """The Grafana dashboard as data."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def panel_expressions() -> list[str]:
    """The PromQL of every panel query."""
    return [
        str(target["expr"])
        for panel in dashboard_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_queries() -> list[str]:
    """The PromQL of the dashboard's query variables."""
    queries = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        queries.append(str(query["query"] if isinstance(query, dict) else query))
    return queries


def fill_variables(expression: str) -> str:
    """`expression` with Grafana's variables replaced by values PromQL accepts."""
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    assert "$" not in expression, f"unknown Grafana variable in {expression}"
    return expression


def label_problems(expression: str, exported: Exposition) -> tuple[int, list[str]]:
    """How many closed-set matchers `expression` has, and those the code can never satisfy."""
    checked = 0
    problems: list[str] = []
    for name, body in SELECTOR.findall(expression):
        for label, op, value in MATCHER.findall(body):
            if label not in CLOSED_LABELS:
                continue
            checked += 1
            known = exported.get(name, {}).get(label)
            if known is None:
                problems.append(f'{name}{{{label}{op}"{value}"}}: {name} has no label {label}')
                continue
            # A regex matcher on a closed label must be a plain alternation of known values.
            wanted = value.split("|") if op in ("=~", "!~") else [value]
            problems.extend(
                f'{name}{{{label}{op}"{value}"}}: {v!r} is not one of {sorted(known)}'
                for v in wanted
                if v not in known
            )
    return checked, problems


def test_rules_pass_promtool_check(promtool: str) -> None:
    """`promtool check rules` accepts the rules file."""
    result = run_promtool(promtool, "check", "rules", RULES.name, cwd=PROMETHEUS)
    assert_success(result)
    assert f"{len(rule_expressions())} rules found" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules` passes every alert's firing and quiet cases."""
    assert_success(run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=PROMETHEUS))


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of the rules file is the subject of some case in the unit tests."""
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} == tested


@dataclass(frozen=True)
class Mutation:
    """One wrong edit to an alert: `old` becomes `new` in its expr, for, or severity."""

    alert: str
    field: str
    old: str
    new: str

    def apply(self, rules: dict[str, Any]) -> None:
        """Make the edit in the loaded rules file, which must contain `old` exactly once there."""
        (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == self.alert]
        holder = rule["labels"] if self.field == "severity" else rule
        text = str(holder[self.field])
        assert text.count(self.old) == 1, f"{self.alert} {self.field}: {self.old!r} not once"
        holder[self.field] = text.replace(self.old, self.new)


MUTATIONS = [
    Mutation("TokenBrokerDown", "for", "2m", "10m"),
    Mutation("TokenBrokerAbsent", "expr", 'job="token-broker"', 'job="token_broker"'),
    Mutation("TokenBrokerGrantReauthRequired", "expr", '"reauth_required"', '"revoked"'),
    Mutation("TokenBrokerAccessTokenExpiring", "expr", "< 60", "< 20"),
    Mutation("TokenBrokerAccessTokenExpiring", "expr", '"active"} > 0', '"active"} >= 0'),
    Mutation("TokenBrokerRefreshFailing", "expr", "> 0.5", "> 1"),
    Mutation("TokenBrokerRefreshFailing", "expr", ">= 3", ">= 1"),
    Mutation("TokenBrokerRefreshSlow", "expr", "> 10", "> 30"),
    Mutation("TokenBrokerRefreshSlow", "expr", ">= 3", ">= 1"),
    Mutation("TokenBrokerRotationLost", "severity", "warning", "critical"),
    Mutation("TokenBrokerTokensUnavailable", "expr", '"unavailable"', '"forbidden"'),
]


@pytest.mark.parametrize(
    "mutation", MUTATIONS, ids=[f"{m.alert}:{m.old}->{m.new}" for m in MUTATIONS]
)
def test_rule_unit_tests_catch_a_changed_rule(
    promtool: str, tmp_path: Path, mutation: Mutation
) -> None:
    """A copy of the rules with one threshold, matcher, duration or severity changed fails."""
    rules = load_rules()
    mutation.apply(rules)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)

    result = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "FAILED" in output
    assert f"alertname: {mutation.alert}," in output


def test_example_config_loads_the_rules(promtool: str) -> None:
    """`promtool check config` accepts the example, which scrapes loopback and loads the rules."""
    result = run_promtool(promtool, "check", "config", EXAMPLE_CONFIG.name, cwd=PROMETHEUS)
    assert_success(result)
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "token-broker"
    assert [t for s in job["static_configs"] for t in s["targets"]] == ["127.0.0.1:9464"]


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every panel query, Grafana variables filled in, parses as PromQL."""
    # The variables' label_values() queries are Grafana's own syntax, not PromQL.
    records = [
        {"record": f"dashboard:query_{i}", "expr": fill_variables(expr)}
        for i, expr in enumerate(panel_expressions())
    ]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = run_promtool(promtool, "check", "rules", rules.name, cwd=tmp_path)
    assert_success(result)
    assert f"{len(records)} rules found" in result.stdout


def test_contract_metrics_are_the_exported_ones(exported: Exposition) -> None:
    """The real registry exports exactly the contract's metrics, with its types and label names."""
    metrics = Metrics(["techniek"])
    metrics.watch_grants(lambda: GrantGauges(by_state={}, min_ttl={}))
    families = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        families[name] = (family.type, frozenset(labels))
    # The grant gauges carry no sample for an empty view; take their labels from the full one.
    for name in ("token_broker_grants", "token_broker_access_token_min_ttl_seconds"):
        families[name] = (families[name][0], frozenset(exported[name]))
    assert families == CONTRACT_METRICS


def test_rules_use_only_exported_metric_names(exported: Exposition) -> None:
    """Every token_broker_* name in the rules is a sample name the broker exports."""
    used = {name for expr in rule_expressions() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 5
    assert used <= exported.keys(), sorted(used - exported.keys())


def test_dashboard_uses_only_exported_metric_names(exported: Exposition) -> None:
    """Every token_broker_* name in the dashboard's queries is a sample name the broker exports."""
    expressions = panel_expressions() + variable_queries()
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert len(used) >= len(CONTRACT_METRICS)
    assert used <= exported.keys(), sorted(used - exported.keys())


def test_rules_and_dashboard_select_only_label_values_the_code_produces(
    exported: Exposition,
) -> None:
    """Every outcome= and state= matcher in the rules and the dashboard names an exported value."""
    checked = 0
    problems: list[str] = []
    for expression in rule_expressions() + panel_expressions() + variable_queries():
        count, found = label_problems(expression, exported)
        checked, problems = checked + count, problems + found
    assert problems == []
    assert checked >= 6, "the matcher scan found too few outcome/state matchers to be trusted"


def test_label_check_rejects_a_value_the_code_never_produces(exported: Exposition) -> None:
    """The label check flags an unknown outcome, a regex of unknown states, and a missing label."""
    _, problems = label_problems(
        'token_broker_refresh_total{outcome="failure"} + token_broker_grants{state=~"active|gone"}'
        ' + token_broker_build_info{outcome="served"}',
        exported,
    )
    assert len(problems) == 3, problems


def test_code_labels_outcomes_from_the_exported_sets(exported: Exposition) -> None:
    """The outcomes the refresher, the API and the rotation recovery count are the exported ones."""
    outcomes = exported["token_broker_refresh_total"]["outcome"]
    assert {outcome.metric_label for outcome in Outcome} == outcomes
    served = {"served", *PROBLEM_OUTCOMES.values()}
    assert served == exported["token_broker_token_requests_total"]["outcome"]
    assert set(RECOVERY_OUTCOMES) == exported["token_broker_rotation_recoveries_total"]["outcome"]


def test_every_contract_metric_has_a_dashboard_panel() -> None:
    """Each metric of the contract appears in some panel's query."""
    expressions = panel_expressions()
    missing = [
        name
        for name in CONTRACT_METRICS
        if not any(re.search(rf"\b{name}(?:_bucket|_sum|_count)?\b", e) for e in expressions)
    ]
    assert missing == []


def test_dashboard_is_templated_on_datasource_instance_and_provider() -> None:
    """Data source, instance and provider are dashboard variables, and every query uses them."""
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"instance", "provider"} <= variables.keys()
    assert dashboard["schemaVersion"] >= 36
    panels = list(dashboard_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'job="token-broker"' in target["expr"], panel["title"]
            if "token_broker_" in target["expr"]:
                assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_alerts_carry_severity_summary_and_description() -> None:
    """Every alert has a known severity, a summary and a description, and links nowhere."""
    for rule in alert_rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]
        assert 'job="token-broker"' in rule["expr"], rule["alert"]
    text = RULES.read_text() + DASHBOARD.read_text()
    assert "://" not in text, "the kit links nowhere outside itself"
