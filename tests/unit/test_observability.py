"""The Grafana dashboard (deploy/grafana/torchserve-handlers.json) queries only metrics TorchServe
is configured to expose, with their real label names, and shows every handler metric."""
import json
import re

import yaml

from handler_kit.metrics import MODEL_METRICS
from scripts.deploy import grafana_dashboard
from models.catalog import METRICS_CONFIG_PATH

# TorchServe adds Hostname to every backend (model) metric it exposes; metrics.yaml does not list it.
BACKEND_ADDED_LABELS = {"Hostname"}
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "by", "without",
                "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
                "label_values"}
GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def load_dashboard() -> dict:
    with open(grafana_dashboard.DASHBOARD_PATH, encoding="utf-8") as f:
        return json.load(f)


def declared_dimensions() -> dict:
    """metric name -> labels it carries, from the metrics.yaml TorchServe is started with."""
    with open(METRICS_CONFIG_PATH, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    out = {}
    for section in ("ts_metrics", "model_metrics"):
        for entries in (config.get(section) or {}).values():
            for metric in entries:
                extra = BACKEND_ADDED_LABELS if section == "model_metrics" else set()
                out[metric["name"]] = set(metric["dimensions"]) | extra
    return out


def parse_query(expr: str):
    """(grouping labels, [(metric, {label: value})]) of a PromQL expression."""
    grouping = {label.strip() for _, labels in GROUPING.findall(expr) for label in labels.split(",")
                if label.strip()}
    bare = re.sub(r"\[[^\]]*\]", "", GROUPING.sub("", expr))
    selectors = []
    for name, matchers, call in SELECTOR.findall(bare):
        if call or name in PROMQL_WORDS:
            continue
        selectors.append((name, {label: value for label, _, value in MATCHER.findall(matchers)}))
    return grouping, selectors


def panels_with_targets(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_committed_dashboard_is_generated_and_valid_json():
    with open(grafana_dashboard.DASHBOARD_PATH, encoding="utf-8") as f:
        assert f.read() == grafana_dashboard.render(), "run `python -m scripts.deploy.grafana_dashboard`"
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap():
    cells = set()
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, panel["title"]
        cells |= mine


def test_data_source_and_model_are_dashboard_variables():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    model = variables["model"]
    assert model["definition"] == model["query"]["query"] == "label_values(HandlerBatches, ModelName)"
    assert model["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for panel in panels_with_targets(dashboard):
        assert panel["targets"], panel["title"]
        for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_queries_use_declared_metrics_with_their_own_labels():
    dimensions = declared_dimensions()
    for panel in panels_with_targets(load_dashboard()):
        for target in panel["targets"]:
            expr, where = target["expr"], f"{panel['title']}: {target['expr']}"
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
            grouping, selectors = parse_query(expr)
            assert selectors, where
            for metric, matchers in selectors:
                assert metric in dimensions, f"{metric} is not in metrics.yaml ({where})"
                assert set(matchers) <= dimensions[metric], f"{metric} has no label {set(matchers)} ({where})"
                assert grouping <= dimensions[metric], f"{metric} has no label {grouping} ({where})"
                # per-model metrics follow the dashboard's model selector
                model_label = {"ModelName", "model_name"} & dimensions[metric]
                for label in model_label:
                    assert matchers.get(label) == "$model", f"{metric} not filtered by $model ({where})"
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
            assert legend_labels <= grouping, f"legend {target['legendFormat']} ({where})"


def test_every_handler_metric_is_shown():
    shown = {metric for panel in panels_with_targets(load_dashboard()) for target in panel["targets"]
             for metric, _ in parse_query(target["expr"])[1]}
    assert set(MODEL_METRICS) - shown == set()
    assert {"ts_inference_requests_total", "ts_queue_latency_microseconds", "Requests4XX",
            "Requests5XX", "CPUUtilization", "MemoryUsed"} <= shown


def test_query_parser_finds_metrics_labels_and_grouping():
    grouping, selectors = parse_query(
        'sum by (ModelName, Reason) (rate(HandlerRejectedInputs{ModelName=~"$model"}[$__rate_interval]))'
        " / on (ModelName) max by (Hostname) (CPUUtilization)")
    assert grouping == {"ModelName", "Reason", "Hostname"}
    assert selectors == [("HandlerRejectedInputs", {"ModelName": "$model"}), ("CPUUtilization", {})]
