"""Reads models/catalog.yaml and derives from it everything TorchServe is given: each archive's
model-config.yaml and the server's config.properties. Nothing about a model is typed twice."""
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG_PATH = os.path.join(ROOT, "models", "catalog.yaml")
CONFIG_PROPERTIES_PATH = os.path.join(ROOT, "config.properties")
MODEL_STORE = os.path.join(ROOT, "model_store")
SERVING_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
MODEL_KEYS = ("name", "version", "description", "handler", "model_files", "weights", "labels",
              "serving", "handler_config", "fidelity", "transform", "variants", "load_at_start")
VARIANT_KEYS = ("variant", "transform", "runtime", "serving", "load_at_start")
TRANSFORMS = ("torchscript", "int8_x86", "onnx")
FIDELITY_METRICS = ("accuracy", "agreement")
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class CatalogError(ValueError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    description: str
    handler: str
    model_files: tuple
    weights: dict
    labels: dict
    serving: dict
    handler_config: dict
    fidelity: dict
    variant: str = "fp32"          # fp32 for a catalog model itself, else the variant's name
    base: str = ""                 # the fp32 model a variant derives from
    transform: Optional[dict] = None
    load_at_start: bool = True     # in config.properties' load_models, served by `make serve`

    def registration(self) -> dict:
        """Management API parameters that register this archive with its catalog settings."""
        s = self.serving
        return {"model_name": self.name, "batch_size": s["batchSize"],
                "max_batch_delay": s["maxBatchDelay"], "initial_workers": s["minWorkers"],
                "response_timeout": s["responseTimeout"]}

    @property
    def mar_name(self) -> str:
        return f"{self.name}.mar"

    def model_config(self, weights_file: str, labels_file: str, meta: dict,
                     model_overrides: Optional[dict] = None) -> dict:
        """The archive's model-config.yaml: serving settings plus the handler section."""
        handler = json.loads(json.dumps(self.handler_config))  # deep copy
        handler["model"].update(model_overrides or {})
        handler["model"]["weights"] = weights_file
        handler["labels"] = labels_file
        handler["meta"] = {"name": self.name, "version": self.version, "variant": self.variant,
                           "description": self.description, **meta}
        return {**self.serving, "handler": handler}


@dataclass(frozen=True)
class Catalog:
    server: dict
    models: List[ModelEntry]

    @property
    def loaded_at_start(self) -> List[ModelEntry]:
        return [m for m in self.models if m.load_at_start]

    def model(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise CatalogError(f"no model named {name!r} in {CATALOG_PATH}; "
                           f"known: {', '.join(m.name for m in self.models)}")


def _entry(raw: dict, index: int) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - set(MODEL_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(MODEL_KEYS)}")
    for key in ("name", "version", "handler", "weights", "labels", "serving", "handler_config"):
        if key not in raw:
            raise CatalogError(f"{where}: '{key}' is missing")
    if not NAME_PATTERN.match(str(raw["name"])):
        raise CatalogError(f"{where}.name {raw['name']!r} must match {NAME_PATTERN.pattern}")
    serving = raw["serving"]
    missing = [k for k in SERVING_KEYS if k not in serving]
    extra = sorted(set(serving) - set(SERVING_KEYS))
    if missing or extra:
        raise CatalogError(f"{where}.serving needs exactly {', '.join(SERVING_KEYS)}"
                           f" (missing: {missing}, unknown: {extra})")
    for key in SERVING_KEYS:
        value, least = serving[key], 0 if key == "maxBatchDelay" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CatalogError(f"{where}.serving.{key} must be an integer >= {least}, got {value!r}")
    if serving["minWorkers"] > serving["maxWorkers"]:
        raise CatalogError(f"{where}.serving: minWorkers exceeds maxWorkers")
    for key in ("weights", "labels"):
        source = raw[key]
        if not isinstance(source, dict) or len({"builder", "file"} & set(source)) != 1:
            raise CatalogError(f"{where}.{key} needs exactly one of 'builder' or 'file'")
    fidelity = dict(raw.get("fidelity") or {"metric": "agreement"})
    if fidelity.get("metric") not in FIDELITY_METRICS:
        raise CatalogError(f"{where}.fidelity.metric must be one of {', '.join(FIDELITY_METRICS)}")
    transform = _transform(raw.get("transform"), where)
    return ModelEntry(name=str(raw["name"]), version=str(raw["version"]),
                      description=str(raw.get("description", "")), handler=str(raw["handler"]),
                      model_files=tuple(raw.get("model_files", ())), weights=dict(raw["weights"]),
                      labels=dict(raw["labels"]), serving=dict(serving),
                      handler_config=dict(raw["handler_config"]), fidelity=fidelity,
                      base=str(raw["name"]), transform=transform,
                      load_at_start=bool(raw.get("load_at_start", True)))


def _transform(transform, where: str) -> Optional[dict]:
    if transform is not None and (not isinstance(transform, dict) or transform.get("kind") not in TRANSFORMS):
        raise CatalogError(f"{where}.transform.kind must be one of {', '.join(TRANSFORMS)}")
    return transform


def _variant(base: ModelEntry, raw: dict, where: str) -> ModelEntry:
    """A variant: the base model's archive with a transform and/or runtime/serving overrides."""
    if not isinstance(raw, dict) or "variant" not in raw:
        raise CatalogError(f"{where} must be a mapping with a 'variant' name")
    unknown = sorted(set(raw) - set(VARIANT_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(VARIANT_KEYS)}")
    transform = _transform(raw.get("transform"), where)  # not inherited: none means eager
    handler_config = json.loads(json.dumps(base.handler_config))
    handler_config.setdefault("runtime", {}).update(raw.get("runtime") or {})
    serving = {**base.serving, **(raw.get("serving") or {})}
    return replace(base, name=f"{base.name}_{raw['variant']}", variant=str(raw["variant"]),
                   description=f"{base.description} ({raw['variant']} variant)", serving=serving,
                   handler_config=handler_config, transform=transform,
                   load_at_start=bool(raw.get("load_at_start", False)))


def load_catalog(path: str = CATALOG_PATH) -> Catalog:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    models = []
    for i, raw_model in enumerate(raw.get("models") or []):
        base = _entry(raw_model, i)
        models.append(base)
        for j, raw_variant in enumerate(raw_model.get("variants") or []):
            models.append(_variant(base, raw_variant, f"models[{i}].variants[{j}]"))
    if not models:
        raise CatalogError(f"{path} declares no models")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise CatalogError(f"{path}: model names must be unique, got {names}")
    return Catalog(server=dict(raw.get("server") or {}), models=models)


def models_property(models: List[ModelEntry]) -> Dict[str, dict]:
    """TorchServe's ``models=`` JSON: per model and version, its archive and serving settings."""
    return {m.name: {m.version: {"defaultVersion": True, "marName": m.mar_name, **m.serving}}
            for m in models}


def render_config_properties(catalog: Catalog, overrides: Optional[dict] = None,
                             header: bool = True) -> str:
    """config.properties text. ``overrides`` (addresses, model_store) let tests and tools start
    a server from exactly this configuration on other ports or folders."""
    settings = {**catalog.server, "model_store": "model_store",
                "load_models": ",".join(m.mar_name for m in catalog.loaded_at_start)}
    settings.update(overrides or {})
    lines = []
    if header:
        lines += ["# Generated by `python -m scripts.render_config` from models/catalog.yaml.",
                  "# Do not edit by hand: edit the catalog and run `make config`.",
                  "# Token authorization stays on (TorchServe 0.12's default): keys are in key_file.json."]
    for key, value in settings.items():
        if isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"{key}={value}")
    models_json = json.dumps(models_property(catalog.loaded_at_start), indent=2, sort_keys=False)
    lines.append("models=" + " \\\n".join(models_json.splitlines()))
    return "\n".join(lines) + "\n"


def parse_config_properties(text: str) -> dict:
    """Java-properties subset reader (continuation lines joined), for checks and tools."""
    props, pending = {}, ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1]
            continue
        stripped, pending = pending + stripped, ""
        key, _, value = stripped.partition("=")
        props[key.strip()] = value.strip()
    return props
