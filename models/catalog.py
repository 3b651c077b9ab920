"""Reads models/catalog.yaml and derives from it everything TorchServe is given: each archive's
model-config.yaml and the server's config.properties. Nothing about a model is typed twice."""
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import yaml

from models.families import FAMILIES as FAMILY_DECLARATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG_PATH = os.path.join(ROOT, "models", "catalog.yaml")
CONFIG_PROPERTIES_PATH = os.path.join(ROOT, "config.properties")
METRICS_CONFIG_PATH = os.path.join(ROOT, "metrics.yaml")
MODEL_STORE = os.path.join(ROOT, "model_store")
SERVING_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
MODEL_KEYS = ("name", "family", "version", "description", "handler", "model_files", "weights",
              "labels", "serving", "handler_config", "fidelity", "transform", "variants",
              "versions", "default_version", "load_at_start", "tuning")
VARIANT_KEYS = ("variant", "transform", "runtime", "serving", "load_at_start")
VERSION_KEYS = ("version", "description", "weights", "serving", "load_at_start")
# The families and what each allows are declared once, in models/families.py.
FAMILIES = tuple(FAMILY_DECLARATIONS)
TRANSFORMS = tuple(dict.fromkeys(k for f in FAMILY_DECLARATIONS.values() for k in f.transforms))
# One vocabulary of variant names across families: a variant is named for what it changes
# (implied_variant_name), so that bf16 means autocast to bfloat16 and torchscript means TorchScript
# everywhere.
VARIANT_NAMES = ("torchscript", "onnx", "int8", "bf16", "fp16")
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16"}
FIDELITY_METRICS = {name: f.metric_names for name, f in FAMILY_DECLARATIONS.items()}
# `make tune` (scripts/bench/tune.py): what a tuned setting must meet. latency_budget_ms: the p99 a setting
# may reach at the tuner's concurrency (16 connections, the bench's) to be eligible. served_goal
# (optional): the share of min(echo ceiling, in-process rate) its served rows should reach in
# `make bench` (scripts/bench/targets.py reports it, met or not).
TUNING_KEYS = ("latency_budget_ms", "served_goal")
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class CatalogError(ValueError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str                    # image | text | tabular: how weights are made and variants gated
    version: str
    description: str
    handler: str
    model_files: tuple
    weights: dict
    labels: Optional[dict]
    serving: dict
    handler_config: dict
    fidelity: dict
    variant: str = "fp32"          # fp32 for a catalog model itself, else the variant's name
    base: str = ""                 # the fp32 model a variant derives from
    transform: Optional[dict] = None
    load_at_start: bool = True     # in config.properties' load_models, served by `make serve`
    is_default: bool = True        # the version /predictions/<name> answers with
    archive: str = ""              # archive file stem: <name>, <name>_<variant> or <name>_v<version>
    tuning: Optional[dict] = None  # {latency_budget_ms: p99 limit for `make tune`}; None: not tuned

    def registration(self) -> dict:
        """Management API parameters that register this archive with its catalog settings."""
        s = self.serving
        return {"model_name": self.name, "batch_size": s["batchSize"],
                "max_batch_delay": s["maxBatchDelay"], "initial_workers": s["minWorkers"],
                "response_timeout": s["responseTimeout"]}

    @property
    def mar_name(self) -> str:
        return f"{self.archive or self.name}.mar"

    def model_config(self, weights_file: str, labels_file: str, meta: dict,
                     model_overrides: Optional[dict] = None) -> dict:
        """The archive's model-config.yaml: serving settings plus the handler section."""
        handler = json.loads(json.dumps(self.handler_config))  # deep copy
        handler["model"].update(model_overrides or {})
        if weights_file:
            handler["model"]["weights"] = weights_file
        if labels_file:
            handler["labels"] = labels_file
        handler["meta"] = {"name": self.name, "version": self.version, "variant": self.variant,
                           "description": self.description, **meta}
        return {**self.serving, "handler": handler}


@dataclass(frozen=True)
class Catalog:
    server: dict
    models: List[ModelEntry]
    deploy: Optional[dict] = None  # KServe deployment settings (scripts/deploy/kserve.py)

    @property
    def loaded_at_start(self) -> List[ModelEntry]:
        return [m for m in self.models if m.load_at_start]

    def model(self, name: str, version: Optional[str] = None) -> ModelEntry:
        """The entry of ``name`` at ``version`` (default: the model's default version)."""
        for entry in self.models:
            if entry.name == name and (entry.version == version if version else entry.is_default):
                return entry
        known = ", ".join(f"{m.name} {m.version}" for m in self.models)
        raise CatalogError(f"no model {name!r}{f' version {version}' if version else ''} in "
                           f"{CATALOG_PATH}; known: {known}")

    def versions(self, name: str) -> List[ModelEntry]:
        return [m for m in self.models if m.name == name]

    def default_versions(self) -> Dict[str, str]:
        """Model name -> the version its unversioned URL must answer with."""
        return {m.name: m.version for m in self.models if m.is_default}

    def archive(self, stem: str) -> ModelEntry:
        """The entry whose archive is model_store/<stem>.mar."""
        for entry in self.models:
            if entry.mar_name == f"{stem}.mar":
                return entry
        raise CatalogError(f"no archive {stem}.mar is declared in {CATALOG_PATH}; known: "
                           f"{', '.join(m.mar_name[:-4] for m in self.models)}")


def _entry(raw: dict, index: int) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - set(MODEL_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(MODEL_KEYS)}")
    for key in ("name", "family", "version", "weights", "serving", "handler_config"):
        if key not in raw:
            raise CatalogError(f"{where}: '{key}' is missing")
    if not NAME_PATTERN.match(str(raw["name"])):
        raise CatalogError(f"{where}.name {raw['name']!r} must match {NAME_PATTERN.pattern}")
    family = raw["family"]
    if family not in FAMILIES:
        raise CatalogError(f"{where}.family {family!r} must be one of {', '.join(FAMILIES)}")
    if FAMILY_DECLARATIONS[family].needs_labels and "labels" not in raw:
        raise CatalogError(f"{where}: 'labels' is missing (an {family} model needs its labels)")
    serving = _serving(raw["serving"], where)
    for key in ("weights", "labels"):
        _source(raw.get(key), f"{where}.{key}", required=key == "weights")
    fidelity = dict(raw.get("fidelity") or {"metric": FIDELITY_METRICS[family][0]})
    if fidelity.get("metric") not in FIDELITY_METRICS[family]:
        raise CatalogError(f"{where}.fidelity.metric must be one of {', '.join(FIDELITY_METRICS[family])} "
                           f"for the {family} family")
    transform = _transform(raw.get("transform"), family, where)
    tuning = _tuning(raw.get("tuning"), where)
    return ModelEntry(name=str(raw["name"]), family=family, version=str(raw["version"]),
                      description=str(raw.get("description", "")),
                      handler=str(raw.get("handler") or FAMILY_DECLARATIONS[family].handler),
                      model_files=tuple(raw.get("model_files", ())), weights=dict(raw["weights"]),
                      labels=dict(raw["labels"]) if raw.get("labels") else None, serving=serving,
                      handler_config=dict(raw["handler_config"]), fidelity=fidelity,
                      base=str(raw["name"]), transform=transform,
                      load_at_start=bool(raw.get("load_at_start", True)), tuning=tuning)


def _tuning(tuning, where: str) -> Optional[dict]:
    if tuning is None:
        return None
    if not isinstance(tuning, dict):
        raise CatalogError(f"{where}.tuning must be a mapping with {', '.join(TUNING_KEYS)}")
    unknown = sorted(set(tuning) - set(TUNING_KEYS))
    if unknown:
        raise CatalogError(f"{where}.tuning: unknown key '{unknown[0]}'; allowed: {', '.join(TUNING_KEYS)}")
    budget = tuning.get("latency_budget_ms")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise CatalogError(f"{where}.tuning.latency_budget_ms must be a number of milliseconds > 0, "
                           f"got {budget!r}")
    goal = tuning.get("served_goal", None)
    if goal is not None and (isinstance(goal, bool) or not isinstance(goal, (int, float)) or not 0 < goal <= 1):
        raise CatalogError(f"{where}.tuning.served_goal must be a share in (0, 1], got {goal!r}")
    return {"latency_budget_ms": budget, **({"served_goal": goal} if goal is not None else {})}


def _source(source, where: str, required: bool) -> None:
    if source is None and not required:
        return
    if not isinstance(source, dict) or len({"builder", "file"} & set(source)) != 1:
        raise CatalogError(f"{where} needs exactly one of 'builder' or 'file'")


def _serving(serving, where: str) -> dict:
    if not isinstance(serving, dict):
        raise CatalogError(f"{where}.serving must be a mapping")
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
    return dict(serving)


def _transform(transform, family: str, where: str) -> Optional[dict]:
    if transform is None:
        return None
    allowed = FAMILY_DECLARATIONS[family].transforms
    if not allowed:
        raise CatalogError(f"{where}.transform: the {family} family has runtime-only variants "
                           "(set handler runtime options such as dtype or quantization instead)")
    if not isinstance(transform, dict) or transform.get("kind") not in allowed:
        raise CatalogError(f"{where}.transform.kind must be one of {', '.join(allowed)}")
    return transform


def implied_variant_name(transform: Optional[dict], runtime: dict) -> str:
    """The vocabulary name of a variant: its transform (TorchScript, ONNX, int8), else its
    runtime change (dynamic int8 quantization, autocast dtype)."""
    kind = (transform or {}).get("kind")
    if kind:
        return "int8" if kind == "int8_x86" else kind
    if runtime.get("quantization", "none") != "none":
        return "int8"
    return DTYPE_NAMES.get(runtime.get("dtype"), "?")


def _variant(base: ModelEntry, raw: dict, where: str) -> ModelEntry:
    """A variant: the base model's archive with a transform and/or runtime/serving overrides."""
    if not isinstance(raw, dict) or "variant" not in raw:
        raise CatalogError(f"{where} must be a mapping with a 'variant' name")
    unknown = sorted(set(raw) - set(VARIANT_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(VARIANT_KEYS)}")
    transform = _transform(raw.get("transform"), base.family, where)  # not inherited: none means eager
    implied = implied_variant_name(transform, raw.get("runtime") or {})
    if raw["variant"] != implied:
        raise CatalogError(f"{where}.variant: '{raw['variant']}' does not name what the variant does; "
                           f"call it '{implied}' (variant names: {', '.join(VARIANT_NAMES)})")
    handler_config = json.loads(json.dumps(base.handler_config))
    handler_config.setdefault("runtime", {}).update(raw.get("runtime") or {})
    serving = {**base.serving, **(raw.get("serving") or {})}
    name = f"{base.name}_{raw['variant']}"
    return replace(base, name=name, archive=name, variant=str(raw["variant"]),
                   description=f"{base.description} ({raw['variant']} variant)", serving=serving,
                   handler_config=handler_config, transform=transform,
                   load_at_start=bool(raw.get("load_at_start", False)))


def _version(base: ModelEntry, raw: dict, where: str) -> ModelEntry:
    """Another version of the same model name: its own weights (and serving settings), its own
    archive <name>_v<version>.mar, served side by side at /predictions/<name>/<version>."""
    if not isinstance(raw, dict) or "version" not in raw:
        raise CatalogError(f"{where} must be a mapping with a 'version'")
    unknown = sorted(set(raw) - set(VERSION_KEYS))
    if unknown:
        raise CatalogError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(VERSION_KEYS)}")
    _source(raw.get("weights"), f"{where}.weights", required=False)
    version = str(raw["version"])
    serving = _serving({**base.serving, **(raw.get("serving") or {})}, where)
    return replace(base, version=version, archive=f"{base.name}_v{version}",
                   description=str(raw.get("description", base.description)),
                   weights=dict(raw.get("weights") or base.weights), serving=serving,
                   load_at_start=bool(raw.get("load_at_start", base.load_at_start)))


def _model_versions(raw_model: dict, base: ModelEntry, where: str) -> List[ModelEntry]:
    entries = [base] + [_version(base, v, f"{where}.versions[{j}]")
                        for j, v in enumerate(raw_model.get("versions") or [])]
    default = str(raw_model.get("default_version", base.version))
    if default not in [e.version for e in entries]:
        raise CatalogError(f"{where}.default_version {default!r} is not one of the declared versions "
                           f"{', '.join(e.version for e in entries)}")
    return [replace(e, is_default=e.version == default) for e in entries]


def load_catalog(path: str = CATALOG_PATH) -> Catalog:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    models = []
    for i, raw_model in enumerate(raw.get("models") or []):
        base = _entry(raw_model, i)
        models.extend(_model_versions(raw_model, base, f"models[{i}]"))
        for j, raw_variant in enumerate(raw_model.get("variants") or []):
            models.append(_variant(base, raw_variant, f"models[{i}].variants[{j}]"))
    if not models:
        raise CatalogError(f"{path} declares no models")
    keys = [(m.name, m.version) for m in models]
    archives = [m.mar_name for m in models]
    if len(set(keys)) != len(keys) or len(set(archives)) != len(archives):
        raise CatalogError(f"{path}: model name/version pairs must be unique, got {keys}")
    return Catalog(server=dict(raw.get("server") or {}), models=models, deploy=raw.get("deploy"))


def models_property(models: List[ModelEntry]) -> Dict[str, dict]:
    """TorchServe's ``models=`` JSON: per model and version, its archive and serving settings.
    The default version is listed first (TorchServe 0.12 makes the first one it loads the default;
    `make serve` sets the configured default again once the server is up)."""
    ordered = sorted(models, key=lambda m: not m.is_default)
    out: Dict[str, dict] = {}
    for m in ordered:
        out.setdefault(m.name, {})[m.version] = {"defaultVersion": m.is_default,
                                                 "marName": m.mar_name, **m.serving}
    return out


def render_config_properties(catalog: Catalog, overrides: Optional[dict] = None,
                             header: bool = True) -> str:
    """config.properties text. ``overrides`` (addresses, model_store) let tests and tools start
    a server from exactly this configuration on other ports or folders."""
    settings = {**catalog.server, "model_store": "model_store",
                "load_models": ",".join(m.mar_name for m in
                                        sorted(catalog.loaded_at_start, key=lambda m: not m.is_default))}
    settings.update(overrides or {})
    lines = []
    if header:
        lines += ["# Generated by `python -m scripts.build.render_config` from models/catalog.yaml.",
                  "# Do not edit by hand: edit the catalog and run `make config`.",
                  "# Token authorization stays on (TorchServe 0.12's default): keys are in key_file.json."]
    for key, value in settings.items():
        if isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"{key}={value}")
    models_json = json.dumps(models_property(catalog.loaded_at_start), indent=2, sort_keys=False)
    lines.append("models=" + " \\\n".join(models_json.splitlines()))
    return "\n".join(lines) + "\n"


def render_metrics_config() -> str:
    """metrics.yaml: TorchServe's default metrics plus the handlers' own (handler_kit.metrics);
    TorchServe exposes only declared backend metrics on its metrics port."""
    import ts
    from handler_kit.metrics import metrics_config
    with open(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)
    return ("# Generated by `python -m scripts.build.render_config` from TorchServe's default metrics.yaml\n"
            "# and handlers/handler_kit/metrics.py. Do not edit by hand: run `make config`.\n"
            + yaml.safe_dump(metrics_config(defaults), sort_keys=False))


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
