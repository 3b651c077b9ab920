"""An archive's handler loaded in this process by TorchServe's own model loader, as
model_service_worker does: used by the tests and by the benchmark's in-process row."""
import json
import os
import sys
from typing import Optional

import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory
from ts.service import Service


def load_service(model_dir: str, batch_size: int = 8, gpu_id: Optional[int] = None) -> Service:
    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    if model_dir not in sys.path:
        sys.path.append(model_dir)  # the worker runs with the model folder importable
    metrics = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["model"]["modelName"]
    loader = ModelLoaderFactory.get_model_loader()
    return loader.load(manifest["model"]["modelName"], model_dir, manifest["model"]["handler"],
                       gpu_id, batch_size, None, True, metrics)
