"""Operator files for Prometheus and Grafana, checked against the server's metrics.

The documentation, alert rules and dashboard are compared with the metrics that
``server.metrics.Metrics`` registers. With Debian's ``prometheus`` package installed, ``promtool``
checks and unit-tests the rules, and a real Prometheus scrapes a real server process.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO_ROOT, free_port

from server.metrics import Metrics

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO_ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "peo-dashboard.json"
JOB = "peo"
REQUIRED_ALERTS = [
    "PeoServerDown",
    "PeoHigh5xxRate",
    "PeoOverloaded",
    "PeoTimeToFirstTokenHigh",
    "PeoFusedCacheChurn",
]
REQUIRED_PANELS = [
    "Request rate by status",
    "Time to first token p50 / p95",
    "Tokens per second",
    "Fused-model cache hit ratio",
    "Fused-model cache bytes",
    "Fused-model cache entries",
    "In-flight and queued requests",
    "Fusion duration p50 / p95",
]
# Grafana variables, replaced by plain values before the queries go to a real Prometheus
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$job": JOB, "$instance": ".*"}
PROMQL_METRIC = re.compile(r"\bpeo_[a-z_]+\b")

needs_promtool = pytest.mark.skipif(
    not PROMTOOL.exists(), reason=f"{PROMTOOL} not found: install Debian's prometheus package"
)
needs_prometheus = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason=f"{PROMETHEUS} not found: install Debian's prometheus package"
)


# what the server exposes


def registered_metrics() -> dict[str, dict]:
    """Return each registered metric by its documented name, with its type and label names.

    A counter is documented as ``name_total`` and a histogram by its base name, as they appear in
    the exposition.
    """
    metrics = {}
    for collector in vars(Metrics()).values():
        kind = getattr(collector, "_type", None)
        if kind is None:
            continue
        name = collector._name + ("_total" if kind == "counter" else "")
        metrics[name] = {"type": kind, "labels": set(collector._labelnames)}
    return metrics


def exposed_series_names() -> set[str]:
    """Return every series name a query may use, such as ``peo_fusion_duration_seconds_bucket``."""
    names = set()
    for name, metric in registered_metrics().items():
        if metric["type"] == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def documented_metrics() -> dict[str, dict]:
    """Return the rows of the reference table in docs/metrics.md, keyed by metric name."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        if not line.startswith("| `peo_"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        labels = (
            set() if cells[2] == "none" else {label.strip(" `") for label in cells[2].split(",")}
        )
        rows[cells[0].strip("`")] = {
            "type": cells[1],
            "labels": labels,
            "unit": cells[3],
            "meaning": cells[4],
        }
    return rows


def alert_rules() -> dict[str, dict]:
    return {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }


def dashboard_targets() -> list[tuple[str, str]]:
    """Return ``(panel title, expression)`` for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def dashboard_query(expression: str) -> str:
    for variable, value in DASHBOARD_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


# documentation


def test_metrics_doc_lists_every_metric():
    assert set(documented_metrics()) == set(registered_metrics())


@pytest.mark.parametrize("name", sorted(registered_metrics()))
def test_metrics_doc_row_matches_metric(name):
    row = documented_metrics()[name]
    metric = registered_metrics()[name]
    assert row["type"] == metric["type"]
    assert row["labels"] == metric["labels"]
    assert row["unit"]
    assert len(row["meaning"]) > 20


# alert rules and dashboard, read as files


@pytest.mark.parametrize("alert", REQUIRED_ALERTS)
def test_alert_rules_define_alert(alert):
    rule = alert_rules()[alert]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


def test_alert_rules_use_exposed_metrics():
    used = {name for rule in alert_rules().values() for name in PROMQL_METRIC.findall(rule["expr"])}
    assert used
    assert used <= exposed_series_names()


@pytest.mark.parametrize("title", REQUIRED_PANELS)
def test_dashboard_has_panel(title):
    titles = [panel_title for panel_title, _ in dashboard_targets()]
    assert title in titles


def test_dashboard_uses_exposed_metrics():
    used = {
        name for _, expression in dashboard_targets() for name in PROMQL_METRIC.findall(expression)
    }
    assert used <= exposed_series_names()


def test_dashboard_panels_have_unique_ids_and_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert len(ids) == len(set(ids))
    assert {"datasource", "job", "instance"} <= variables
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])


# promtool


def run_promtool(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PROMTOOL), *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_promtool_accepts_alert_rules():
    result = run_promtool("check", "rules", str(ALERTS.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(REQUIRED_ALERTS)} rules found" in result.stdout


@needs_promtool
def test_promtool_alert_unit_tests_pass():
    result = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_example_config():
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


# a real Prometheus scraping a real server


class PrometheusProcess:
    """A Prometheus child process on 127.0.0.1 that scrapes one target every second."""

    def __init__(self, target: str, workdir: Path, ready_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")
        command = [
            str(PROMETHEUS),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process = subprocess.Popen(
            command, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def query(self, expression: str) -> dict:
        """Run an instant query and return the JSON response of the HTTP API."""
        response = httpx.get(self.url + "/api/v1/query", params={"query": expression}, timeout=10)
        return response.json()

    def wait_for_result(self, expression: str, timeout: float = 60.0) -> list:
        """Return the query's result once it is not empty, or ``[]`` when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expression).get("data", {}).get("result", [])
            if result:
                return result
            time.sleep(0.5)
        return []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Start Prometheus scraping the test server, then send traffic that includes a cache hit."""
    process = PrometheusProcess(f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus"))
    repeated = {
        "prompt": "Hello",
        "max_new_tokens": 2,
        "coefficients": {"helpfulness": 0.23, "harmlessness": 0.61},
    }
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for body in (repeated, repeated, {"prompt": "Hi", "max_new_tokens": 2, "preference": 0.2}):
            assert client.post("/generate", json=body).status_code == 200
    yield process
    process.stop()


@needs_prometheus
def test_prometheus_target_is_up(prometheus):
    result = prometheus.wait_for_result(f'up{{job="{JOB}"}} == 1')
    assert len(result) == 1, prometheus.log_text()
    assert result[0]["metric"]["instance"].startswith("127.0.0.1:")


@needs_prometheus
def test_prometheus_counts_requests(prometheus):
    result = prometheus.wait_for_result(
        f'sum(peo_requests_total{{job="{JOB}", route="/generate"}}) > 0'
    )
    assert result, prometheus.log_text()
    assert float(result[0]["value"][1]) >= 3


@needs_prometheus
def test_prometheus_counts_cache_hits(prometheus):
    result = prometheus.wait_for_result(f'peo_fused_cache_hits_total{{job="{JOB}"}} > 0')
    assert result, prometheus.log_text()
    assert float(result[0]["value"][1]) >= 1


def evaluated_rules(prometheus: PrometheusProcess, timeout: float = 60.0) -> list[dict]:
    """Return the loaded rules once each has been evaluated (health no longer ``unknown``)."""
    deadline = time.monotonic() + timeout
    while True:
        groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = rules and all(rule["health"] != "unknown" for rule in rules)
        if evaluated or time.monotonic() > deadline:
            return rules
        time.sleep(0.5)


@needs_prometheus
def test_prometheus_evaluates_alert_rules(prometheus):
    rules = evaluated_rules(prometheus)
    assert sorted(rule["name"] for rule in rules) == sorted(REQUIRED_ALERTS)
    assert [rule["name"] for rule in rules if rule["health"] != "ok"] == []


@needs_prometheus
@pytest.mark.parametrize(
    "title,expression", dashboard_targets(), ids=[title for title, _ in dashboard_targets()]
)
def test_dashboard_query_runs_in_prometheus(prometheus, title, expression):
    answer = prometheus.query(dashboard_query(expression))
    assert answer["status"] == "success", f"{title}: {answer.get('error')}"


@needs_prometheus
def test_dashboard_request_rate_has_data(prometheus):
    expression = dict(dashboard_targets())["Request rate by status"]
    result = prometheus.wait_for_result(dashboard_query(expression))
    statuses = {series["metric"].get("status") for series in result}
    assert "200" in statuses, expression
