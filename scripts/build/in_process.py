"""An archive's handler loaded in this process by TorchServe's own model loader, as
model_service_worker does: used by the tests and by the benchmark's in-process row.

The project itself is installed (pyproject.toml) and never edits the import path; this module is
the one place that does, because it stands in for a TorchServe worker: the frontend starts each
worker with its model folder (the extracted archive) on the import path, where the handler file,
the bundled handler_kit and the model's own module (digits_cnn.py, a user's file) are imported by
their top-level names.
"""
import contextlib
import json
import os
import sys
from typing import Iterator, List, Optional

import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory
from ts.service import Service


# The model folders load_service has made importable in this process (see new_worker_imports).
_MODEL_DIRS: List[str] = []


def load_service(model_dir: str, batch_size: int = 8, gpu_id: Optional[int] = None) -> Service:
    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    if model_dir not in _MODEL_DIRS:
        _MODEL_DIRS.append(model_dir)
    if model_dir not in sys.path:
        sys.path.append(model_dir)  # the worker runs with its model folder importable, for good
    metrics = MetricsCacheYamlImpl(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["model"]["modelName"]
    loader = ModelLoaderFactory.get_model_loader()
    return loader.load(manifest["model"]["modelName"], model_dir, manifest["model"]["handler"],
                       gpu_id, batch_size, None, True, metrics)


@contextlib.contextmanager
def importable(*folders: str) -> Iterator[None]:
    """While the block runs, modules in ``folders`` import by their top-level names, as they do
    in a worker whose model folder holds them (an archive's model module, digits_cnn.py or a
    user's file); the import path is restored afterwards."""
    sys.path[:0] = folders
    try:
        yield
    finally:
        for folder in folders:
            sys.path.remove(folder)


@contextlib.contextmanager
def new_worker_imports() -> Iterator[None]:
    """While the block runs, imports resolve as in a newly started worker, whose import path
    holds no other archive's folder: the model folders that earlier load_service calls left on
    the import path, and the top-level modules imported from them (a handler file such as
    image_classifier.py, a model module), are out of sight. Where an archive names TorchServe's
    stock ``image_classifier`` handler, TorchServe's model loader then finds the stock one, as a
    worker does, not a project handler file of that name loaded earlier. Restored afterwards."""
    folders = {os.path.abspath(f) for f in _MODEL_DIRS}
    hidden = {name: module for name, module in sys.modules.items()
              if "." not in name and _loaded_from(module, folders)}
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in folders]
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.modules.update(hidden)


def _loaded_from(module, folders) -> bool:
    """Whether a top-level module is a file (or package) directly inside one of ``folders``."""
    path = getattr(module, "__file__", None)
    if not path:
        return False
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == "__init__.py":
        parent = os.path.dirname(parent)
    return parent in folders
