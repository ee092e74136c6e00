"""examples/monitoring: the Grafana dashboard queries only series a real `dsv32 serve` exports.

The dashboard's PromQL (every panel target and every variable's query) is parsed into the series it selects, the
labels its matchers name and the labels it groups by; a real server (MTP on, so the speculative-decoding series
exist) is given traffic of every kind the panels show (streamed and not, OpenAI and Anthropic routes, prefix-cache
hits, errors of several codes, refusals of a full queue), then ``/metrics`` is scraped and each of those series and
labels must be in it. The files that wire Prometheus and Grafana together are checked against each other too.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import API_KEY, ServerProcess

MONITORING = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "dsv32.json"
# Labels Prometheus adds to every series it scrapes (the target's), not the server.
TARGET_LABELS = {"instance", "job"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<variable>\$\{\w+\}|\$\w+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][\w:]*)
  | (?P<punct>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
""", re.VERBOSE)
_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values", "group", "limitk", "limit_ratio"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"bool", "and", "or", "unless", "offset"}


def tokens(expr: str) -> list[tuple[str, str]]:
    """PromQL (with Grafana's ``$variables``) as (kind, text) tokens; text PromQL does not have fails."""
    found, position = [], 0
    for match in _TOKEN.finditer(expr):
        assert match.start() == position, f"cannot read {expr[position:position + 20]!r} in {expr!r}"
        position = match.end()
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
    assert position == len(expr), f"cannot read {expr[position:]!r} in {expr!r}"
    return found


def parse_promql(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(the series ``expr`` selects with the labels each one's matchers name, the labels it groups or matches by)."""
    toks = tokens(expr)
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "name" and text in _GROUPING:
            i += 1
            if following == ("punct", "("):
                close = toks.index(("punct", ")"), i)
                grouping |= {label for label_kind, label in toks[i + 1:close] if label_kind == "name"}
                i = close + 1
            continue
        if kind == "name" and (text in _KEYWORDS or following == ("punct", "(") or (
                text in _AGGREGATIONS and following[1] in _GROUPING)):
            i += 1  # a keyword, a function or an aggregation
            continue
        if kind == "name":
            labels: set[str] = set()
            i += 1
            if following == ("punct", "{"):
                close = toks.index(("punct", "}"), i)
                matchers = toks[i + 1:close]
                labels = {matchers[j][1] for j in range(0, len(matchers), 4)}  # name, operator, value, comma
                assert all(matchers[j][0] == "name" and matchers[j + 2][0] == "string"
                           for j in range(0, len(matchers), 4)), f"odd label matchers in {expr!r}"
                i = close + 1
            selectors.append((text, labels))
            continue
        assert (kind, text) != ("punct", "{"), f"a selector without a metric name in {expr!r}"
        i += 1
    return selectors, grouping


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, and what the variables' label_values() select."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
            assert found, variable["definition"]
            queries.append(f"group by ({found.group(2)}) ({found.group(1)})")
    return queries


# ---------------------------------------------------------------------------------------------------- files


def test_promql_parser() -> None:
    selectors, grouping = parse_promql(
        'histogram_quantile(0.9, sum by (le) (rate(a:b_bucket{model_name=~"$m", x!="y,}"}[$__rate_interval]))) '
        '/ ignoring (position) group_left sum(c) * $price + 1e3')
    assert selectors == [("a:b_bucket", {"model_name", "x"}), ("c", set())]
    assert grouping == {"le", "position"}
    with pytest.raises(AssertionError, match="cannot read"):
        parse_promql("sum(a) ? b")


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "model_name", "instance", "gpu_price_per_hour"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, (panel["title"], used - variables)
    titles = " | ".join(panel["title"] for panel in panels)
    for needed in ("Time to first token", "Inter-token latency", "TPOT", "Tokens per second", "running / waiting",
                   "KV-cache usage", "Prefix-cache hit rate", "MTP acceptance", "Errors by status code",
                   "Cost per 1K tokens"):
        assert needed in titles


def test_prometheus_and_grafana_files_agree() -> None:
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["localhost:8000"]
    compose = yaml.safe_load((MONITORING / "docker-compose.yml").read_text())["services"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in compose["grafana"]["volumes"])
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/dsv32.yml").read_text())
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"
    assert source["datasources"][0]["url"].endswith(":9090")


# ---------------------------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    # One sequence at a time and one waiting: concurrent requests beyond that are refused (503, "overloaded").
    return server_factory("tiny", "--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting-requests", "1",
                          "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}')


def send_traffic(base_url: str) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long_prompt = [{"role": "user", "content": "Tell me about the weather in Paris today. " * 20}]
    with httpx.Client(base_url=base_url, headers=auth, timeout=120) as http:
        for _ in range(2):  # the second finds the first one's prompt in the prefix cache
            response = http.post("/v1/chat/completions", json={"messages": long_prompt, "max_tokens": 8})
            assert response.status_code == 200, response.text
        response = http.post("/v1/chat/completions", json={"messages": long_prompt, "max_tokens": 8,
                                                            "stream": True})
        assert response.status_code == 200 and "[DONE]" in response.text
        response = http.post("/v1/messages", json={"model": "tiny", "max_tokens": 8, "messages": long_prompt,
                                                   "stream": True})
        assert response.status_code == 200 and "message_stop" in response.text
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert http.post("/v1/messages", json={"model": "nope", "max_tokens": 1,
                                               "messages": long_prompt}).status_code == 404
        assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}).status_code == 401

        def generate(_: int) -> int:
            return http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 32,
                                                      "ignore_eos": True}).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(generate, range(6)))
        assert 503 in statuses and 200 in statuses, statuses


def exported_labels(server: ServerProcess) -> dict[str, set[str]]:
    """Each sample name /metrics exports -> the labels its samples carry."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_every_series_the_dashboard_queries_is_exported(server: ServerProcess) -> None:
    send_traffic(server.base_url)
    exported = exported_labels(server)
    problems = []
    for expr in dashboard_queries():
        selectors, grouping = parse_promql(expr)
        assert selectors, expr
        available = set(TARGET_LABELS)
        for metric, labels in selectors:
            if metric not in exported:
                problems.append(f"{metric} is not exported (in {expr})")
                continue
            available |= exported[metric]
            if missing := labels - exported[metric] - TARGET_LABELS:
                problems.append(f"{metric} has no label {sorted(missing)} (in {expr})")
        if missing := grouping - available:
            problems.append(f"no series of {expr} has the label(s) {sorted(missing)}")
    assert not problems, "\n".join(problems)
    assert exported["dsv32:request_errors_total"] >= {"code"}
    values = server.metrics()
    for code in (400, 401, 404, 503):
        assert values[f"dsv32:request_errors_total{{code={code}}}"] >= 1
    assert values["dsv32:requests_rejected_total{reason=overloaded}"] >= 1
    assert values["vllm:prefix_cache_hits_total"] > 0 and values["vllm:spec_decode_num_drafts_total"] > 0
    assert values["dsv32:engine_devices"] == 1
