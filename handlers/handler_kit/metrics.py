"""The handlers' own Prometheus metrics: stage times, batch sizes and rejected inputs per reason.

TorchServe exposes a backend metric on its metrics port only when its metrics configuration
declares it: `python -m scripts.build.render_config` writes metrics.yaml from MODEL_METRICS below plus
TorchServe's own defaults, and config.properties points metrics_config at it.

Times and sizes are counters of sums (with a batch counter beside them), the Prometheus way to get
averages over any window: rate(HandlerInferenceMilliseconds) / rate(HandlerBatches).
"""
import time
from contextlib import contextmanager
from typing import Dict

MODEL_DIMENSIONS = ["ModelName", "ModelVersion"]
# name -> (type, unit, extra dimensions)
MODEL_METRICS = {
    "HandlerBatches": ("counter", "Count", []),
    "HandlerBatchRequests": ("counter", "Count", []),
    "HandlerPreprocessMilliseconds": ("counter", "ms", []),
    "HandlerInferenceMilliseconds": ("counter", "ms", []),
    "HandlerPostprocessMilliseconds": ("counter", "ms", []),
    "HandlerLastBatchSize": ("gauge", "Count", []),
    "HandlerRejectedInputs": ("counter", "Count", ["Reason"]),
}


class HandlerMetrics:
    """Thin wrapper over TorchServe's metrics cache (context.metrics) for one model."""

    def __init__(self, metrics_cache, model_name: str, version: str):
        from ts.metrics.metric_type_enum import MetricTypes
        self.dimensions = [model_name, version]
        self._metrics = {}
        for name, (kind, unit, extra) in MODEL_METRICS.items():
            metric_type = MetricTypes.COUNTER if kind == "counter" else MetricTypes.GAUGE
            self._metrics[name] = metrics_cache.add_metric_to_cache(
                name, unit, MODEL_DIMENSIONS + extra, metric_type)

    def add(self, name: str, value: float, *extra_dimensions: str) -> None:
        self._metrics[name].add_or_update(value, self.dimensions + list(extra_dimensions))

    @contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(f"Handler{stage}Milliseconds", (time.perf_counter() - started) * 1000.0)

    def batch(self, size: int, rejected: Dict[int, object]) -> None:
        """One server-side batch of ``size`` requests, with the rejected ones' errors."""
        self.add("HandlerBatches", 1)
        self.add("HandlerBatchRequests", size)
        self.add("HandlerLastBatchSize", size)
        for error in rejected.values():
            self.add("HandlerRejectedInputs", 1, getattr(error, "kind", "bad_input"))


class NoMetrics:
    """Stand-in during warm-up (before the first request) and outside TorchServe."""

    def add(self, *_):
        pass

    @contextmanager
    def timed(self, _stage):
        yield

    def batch(self, *_):
        pass


def metrics_config(defaults: dict) -> dict:
    """TorchServe's default metrics configuration plus the handlers' MODEL_METRICS."""
    config = dict(defaults)
    model_metrics = {kind: list(entries) for kind, entries in (config.get("model_metrics") or {}).items()}
    for name, (kind, unit, extra) in MODEL_METRICS.items():
        model_metrics.setdefault(kind, []).append(
            {"name": name, "unit": unit, "dimensions": MODEL_DIMENSIONS + extra})
    config["model_metrics"] = model_metrics
    return config
