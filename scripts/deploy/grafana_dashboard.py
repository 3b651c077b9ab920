"""Writes deploy/grafana/torchserve-handlers.json, the Grafana dashboard of the handlers' own
metrics (handlers/handler_kit/metrics.py) beside TorchServe's frontend and host metrics.

    python -m scripts.deploy.grafana_dashboard           # regenerate the committed file
    python -m scripts.deploy.grafana_dashboard --check   # exit 1 if the committed file is stale

Averages come from counters of sums: rate(sum) / rate(count) over Grafana's $__rate_interval,
so that they hold over any time range. The Prometheus data source is a dashboard variable
(DS_PROMETHEUS), so the file works both imported in the UI and provisioned from disk.
"""
import argparse
import json
import os
import sys
from typing import List, Sequence, Tuple

from models.catalog import ROOT

DASHBOARD_PATH = os.path.join(ROOT, "deploy", "grafana", "torchserve-handlers.json")
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SCHEMA_VERSION = 39  # Grafana 11.0; newer Grafana migrates it on load
WINDOW = "[$__rate_interval]"
HANDLER_SELECTOR = '{ModelName=~"$model"}'       # the handlers' metrics (metrics.yaml model_metrics)
FRONTEND_SELECTOR = '{model_name=~"$model"}'     # TorchServe's per-model frontend metrics
BY_MODEL = "ModelName, ModelVersion"
MODEL_LEGEND = "{{ModelName}} {{ModelVersion}}"
FULL_WIDTH = 24


def handler_rate(metric: str, by: str = BY_MODEL) -> str:
    return f"sum by ({by}) (rate({metric}{HANDLER_SELECTOR}{WINDOW}))"


def per_batch(metric: str) -> str:
    """Mean of a handler counter per batch: its rate over the rate of HandlerBatches."""
    return f"{handler_rate(metric)} / {handler_rate('HandlerBatches')}"


def frontend_rate(metric: str) -> str:
    return f"sum by (model_name) (rate({metric}{FRONTEND_SELECTOR}{WINDOW}))"


def per_request(metric: str) -> str:
    """Mean of a frontend counter of microseconds per request."""
    return f"{frontend_rate(metric)} / {frontend_rate('ts_inference_requests_total')}"


def timeseries(title: str, description: str, unit: str, targets: Sequence[Tuple[str, str]],
               stacked: bool = False, bars: bool = False, width: int = 12) -> dict:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": 8},
        "fieldConfig": {
            "defaults": {
                "unit": unit, "min": 0,
                "custom": {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars else 10,
                           "lineWidth": 1, "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stacked else "none", "group": "A"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": ["mean", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend, "range": True}
                    for i, (expr, legend) in enumerate(targets)],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"w": FULL_WIDTH, "h": 1}}


def sections() -> List[dict]:
    return [
        row("Traffic"),
        timeseries("Requests/s", "Inference requests the frontend received (ts_inference_requests_total).",
                   "reqps", [(frontend_rate("ts_inference_requests_total"), "{{model_name}}")]),
        timeseries("Batches/s", "Server-side batches the handler ran (HandlerBatches).", "ops",
                   [(handler_rate("HandlerBatches"), MODEL_LEGEND)]),
        timeseries("Mean batch size",
                   "Requests per batch: rate(HandlerBatchRequests) / rate(HandlerBatches); and the size "
                   "of the last batch. Far below batchSize under load: maxBatchDelay is too short.",
                   "short", [(per_batch("HandlerBatchRequests"), f"{MODEL_LEGEND} mean"),
                             (f"max by ({BY_MODEL}) (HandlerLastBatchSize{HANDLER_SELECTOR})",
                              f"{MODEL_LEGEND} last")]),
        timeseries("Request and queue latency",
                   "Mean per request, from the frontend: total latency (ts_inference_latency_microseconds) "
                   "and the part spent queued for a worker (ts_queue_latency_microseconds).", "µs",
                   [(per_request("ts_inference_latency_microseconds"), "{{model_name}} latency"),
                    (per_request("ts_queue_latency_microseconds"), "{{model_name}} queued")]),
        row("Handler stages"),
        timeseries("Handler time per batch by stage",
                   "Mean milliseconds per batch in preprocess (decode, resize), inference (the model) "
                   "and postprocess (top-k, JSON): rate(Handler<Stage>Milliseconds) / rate(HandlerBatches).",
                   "ms", [(per_batch("HandlerPreprocessMilliseconds"), f"{MODEL_LEGEND} preprocess"),
                          (per_batch("HandlerInferenceMilliseconds"), f"{MODEL_LEGEND} inference"),
                          (per_batch("HandlerPostprocessMilliseconds"), f"{MODEL_LEGEND} postprocess")],
                   stacked=True),
        timeseries("Model time per request",
                   "Mean inference milliseconds per request: rate(HandlerInferenceMilliseconds) / "
                   "rate(HandlerBatchRequests). Falls as batches fill up.", "ms",
                   [(f"{handler_rate('HandlerInferenceMilliseconds')} / {handler_rate('HandlerBatchRequests')}",
                     MODEL_LEGEND)]),
        row("Errors"),
        timeseries("Rejected inputs/s by reason",
                   "Requests the handler answered with a 4xx, by reason (bad_input 400, too_large 413, "
                   "unsupported_media_type 415, not_ready 503) (HandlerRejectedInputs).", "reqps",
                   [(handler_rate("HandlerRejectedInputs", "ModelName, Reason"), "{{ModelName}} {{Reason}}")],
                   stacked=True, bars=True),
        timeseries("Responses/s by status class (all models)",
                   "TorchServe's Requests2XX/4XX/5XX count every API call of the server (management and "
                   "unauthorized calls included); they carry no model label.", "reqps",
                   [(f"sum(rate(Requests2XX{WINDOW}))", "2xx"), (f"sum(rate(Requests4XX{WINDOW}))", "4xx"),
                    (f"sum(rate(Requests5XX{WINDOW}))", "5xx")]),
        row("Host (TorchServe reports host-level figures only, once a minute)"),
        timeseries("CPU utilization", "CPUUtilization of the host TorchServe runs on.", "percent",
                   [("max by (Hostname) (CPUUtilization)", "{{Hostname}}")], width=8),
        timeseries("Memory", "MemoryUsed and MemoryAvailable of the host, megabytes.", "decmbytes",
                   [("max by (Hostname) (MemoryUsed)", "{{Hostname}} used"),
                    ("max by (Hostname) (MemoryAvailable)", "{{Hostname}} available")], width=8),
        timeseries("GPU", "GPUUtilization and GPUMemoryUtilization per device (empty on CPU hosts).",
                   "percent", [("max by (Hostname, DeviceId) (GPUUtilization)", "{{Hostname}} gpu{{DeviceId}} busy"),
                               ("max by (Hostname, DeviceId) (GPUMemoryUtilization)",
                                "{{Hostname}} gpu{{DeviceId}} memory")], width=8),
    ]


def lay_out(panels: List[dict]) -> List[dict]:
    """Ids and positions: panels fill lines of 24 columns, a row starts a new line."""
    x = y = line_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > FULL_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        pos.update(x=x, y=y)
        panel["id"] = panel_id
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if panel["type"] == "row":
            x, y, line_height = 0, y + pos["h"], 0
    return panels


def templating() -> dict:
    model_query = "label_values(HandlerBatches, ModelName)"
    return {"list": [
        {"type": "datasource", "name": "DS_PROMETHEUS", "label": "Prometheus", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
         "regex": ""},
        {"type": "query", "name": "model", "label": "Model", "datasource": DATASOURCE,
         "definition": model_query,
         "query": {"query": model_query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
         "hide": 0, "includeAll": True, "allValue": ".*", "multi": True, "options": [], "refresh": 2,
         "regex": "", "sort": 1},
    ]}


def dashboard() -> dict:
    return {
        "id": None, "uid": "torchserve-handlers", "title": "TorchServe handlers",
        "description": "Handler stage times, batch sizes and rejected inputs (handlers/handler_kit/"
                       "metrics.py) with TorchServe's request, queue and host metrics. Generated by "
                       "scripts/deploy/grafana_dashboard.py.",
        "tags": ["torchserve", "pytorch"], "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": templating(),
        "panels": lay_out(sections()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            with open(DASHBOARD_PATH, encoding="utf-8") as f:
                current = f.read() == text
        except FileNotFoundError:
            current = False
        if not current:
            print(f"{DASHBOARD_PATH} is stale: run `python -m scripts.deploy.grafana_dashboard`", file=sys.stderr)
        return 0 if current else 1
    os.makedirs(os.path.dirname(DASHBOARD_PATH), exist_ok=True)
    with open(DASHBOARD_PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(DASHBOARD_PATH, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
