"""Every model family, declared once: what the catalog, the build, the fidelity gate, the bench,
the bad-input corpus, the fault drill and the KServe rehearsal need to know about a family. None
of them branches on a family or a model name: they read this.

A family is the kind of thing a model takes and answers (images -> classes, texts -> vectors,
rows -> numbers): its handler, its wire format, what one item is called, which fidelity metrics
gate its variants and how each is measured, what its weights and variant figures are made from
(the build's cache keys), how its variants are made, and the limits its handler enforces.

What a model is sent is its family's *samples*, chosen from the model's own handler config
(an image model taking grayscale 8x8 pictures is sent held-out digit PNGs; an RGB one, the
photographs): real inputs for the bench, the fault drill and the rehearsal, the good requests and
bad-input cases of the corpus, and (where the samples are labelled) the held-out data of the
``accuracy`` metric.

Parts are named "module:function" and imported when used, so that reading this module costs
nothing (the catalog reads it) and nothing here imports torch, the scripts or the handlers.
Adding a model of an existing family is a catalog entry (plus its weights builder); adding a
family is one more ``Family`` here (and its handler).
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple


def resolve(reference: str):
    """The object a "module:attribute" reference names (imported on first use)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Samples:
    """One kind of real input a family's models take. Every part is a "module:function"."""
    name: str
    bench: str                      # () -> {name: request body}: the bench workload (one item each)
    drill: str                      # () -> [request body]: the fault drill's steady load
    good: str                       # (model) -> [GoodRequest]: valid requests the corpus mixes cases with
    cases: str                      # (model, limits, max_request_size) -> [Case]: the bad-input corpus
    rehearsal: str                  # () -> one KServe v1 instance, or None (readiness check only)
    # (image section of the handler config) -> (inputs, labels): held-out labelled data, where the
    # samples have labels (the ``accuracy`` metric measures on it)
    labelled: Optional[str] = None


@dataclass(frozen=True)
class Metric:
    """A fidelity metric: how a variant is compared with its fp32 model, and on what data."""
    name: str
    # What it is measured on: "labelled" (the model's samples' held-out labelled data), else a
    # "module:function" giving the data.
    data: str
    # Runtime-only variants: (model path, handler config, fidelity) -> figures, through the
    # handler's own stages. Transform variants are measured by the build on ``data``.
    figures: Optional[str] = None
    # The metric's gate (what a variant must pass to be packaged) and how its figures read in the
    # bench and the docs: a scripts/build/fidelity.py MetricRules.
    rules: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    handler: str                    # the handler file its catalog models name
    content_type: str               # how clients send one item (the bench, single requests)
    item_unit: str                  # one item in the bench tables (img, texts, rows)
    item_noun: str                  # one item in prose (image, text, row)
    metrics: Tuple[Metric, ...]     # fidelity metrics allowed; the first is the default
    weights_sources: Tuple[str, ...]   # what its weights are made from: a change rebuilds them
    variant_sources: Tuple[str, ...]   # what its variant figures are made from (with scripts/build/fidelity.py)
    # "transform": a variant's archive holds a transformed model (TorchScript, int8, ONNX),
    # measured by the build on the metric's data; "runtime": variants are handler runtime options
    # (dtype, quantization) on the same weights, measured by the metric's ``figures``.
    variants: str
    transforms: Tuple[str, ...] = ()   # transform kinds allowed ("transform" variants only)
    needs_labels: bool = False      # a catalog entry must name its labels
    model_folder: bool = False      # weights are a model folder (config, tokenizer, weights), not a file
    runtime_label: str = ""         # (handler config) -> how an archive runs, e.g. "torchscript, int8_x86"
    # The limits its handler enforces that the bad-input cases are built around: name ->
    # (path in the handler config, the handler's default). tests/unit/test_families.py checks the
    # defaults against the handler's own config parser.
    limits: Dict[str, Tuple[Tuple[str, ...], int]] = field(default_factory=dict)
    # (handler config) -> the name of the samples (in SAMPLES) its models are sent
    choose_samples: Callable[[dict], str] = lambda config: ""

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"the {self.name} family has no fidelity metric {name!r}; "
                       f"allowed: {', '.join(self.metric_names)}")

    @property
    def metric_names(self) -> Tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def handler_limits(self, handler_config: dict) -> Dict[str, int]:
        """The limits of a model of this family: its handler config's, else the handler's default."""
        out = {}
        for name, (path, default) in self.limits.items():
            value = handler_config
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            out[name] = int(default if value is None else value)
        return out

    def samples(self, handler_config: dict) -> Samples:
        return SAMPLES[self.choose_samples(handler_config)]


# -- samples -------------------------------------------------------------------------------------
_CASES, _IMAGES = "scripts.drills.bad_input_cases", "scripts.drills.bad_input_images"

SAMPLES: Dict[str, Samples] = {s.name: s for s in (
    Samples("photos",  # the two photographs that ship with scikit-learn
            bench="scripts.bench.measure:load_photos", drill="models.sample_data:photo_bytes",
            good=f"{_IMAGES}:photo_requests", cases=f"{_IMAGES}:photo_cases",
            rehearsal="scripts.deploy.kserve_runtime:photo_instance"),
    Samples("digits",  # scikit-learn's held-out 8x8 digits as 8-bit grayscale PNGs
            bench="scripts.bench.measure:load_digits", drill="scripts.drills.fault_drill:digit_bodies",
            good=f"{_IMAGES}:digit_requests", cases=f"{_IMAGES}:digit_cases",
            rehearsal="scripts.deploy.kserve_runtime:digit_instance", labelled="models.variants:digits_heldout"),
    Samples("sentences",  # the fidelity gate's real sentences (models/sentences.py)
            bench="scripts.bench.measure:load_sentences", drill="scripts.drills.fault_drill:sentence_bodies",
            good=f"{_CASES}:sentence_requests", cases=f"{_CASES}:sentence_cases",
            rehearsal="scripts.deploy.kserve_runtime:sentence_instance"),
    Samples("diabetes_rows",  # held-out rows of scikit-learn's diabetes set, in its own units
            bench="scripts.bench.measure:load_diabetes_rows", drill="scripts.drills.fault_drill:row_bodies",
            good=f"{_CASES}:row_requests", cases=f"{_CASES}:row_cases",
            rehearsal="scripts.deploy.kserve_runtime:row_instance"),
)}


def _image_samples(config: dict) -> str:
    """Grayscale models (the 8x8 digits CNN) are sent digits; RGB models the photographs."""
    return "digits" if (config.get("image") or {}).get("color") == "grayscale" else "photos"


# -- families ------------------------------------------------------------------------------------
FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family(
        "image", handler="handlers/image_classifier.py", content_type="application/octet-stream",
        item_unit="img", item_noun="image",
        metrics=(Metric("accuracy", data="labelled", rules="scripts.build.fidelity:ACCURACY"),
                 Metric("agreement", data="scripts.build.fidelity:photo_views",
                        rules="scripts.build.fidelity:AGREEMENT")),
        weights_sources=("models/weights.py", "models/sample_data.py", "handlers/handler_kit/vision.py"),
        variant_sources=("models/variants.py", "handlers/handler_kit/runtime.py",
                         "handlers/handler_kit/vision.py", "handlers/handler_kit/config.py",
                         "handlers/handler_kit/image_config.py"),
        variants="transform", transforms=("torchscript", "int8_x86", "onnx"), needs_labels=True,
        runtime_label="scripts.bench.report:image_runtime_label",
        limits={"max_pixels": (("image", "max_pixels"), 50_000_000), "topk": (("topk",), 5)},
        choose_samples=_image_samples),
    Family(
        "text", handler="handlers/text_embedder.py", content_type="text/plain; charset=utf-8",
        item_unit="texts", item_noun="text",
        metrics=(Metric("embedding", data="models.sentences:fidelity_sentences",
                        figures="scripts.build.fidelity:text_figures", rules="scripts.build.fidelity:EMBEDDING"),),
        weights_sources=("models/weights.py",),
        variant_sources=("models/sentences.py", "handlers/handler_kit/text.py",
                         "handlers/handler_kit/text_config.py", "handlers/handler_kit/quantization.py"),
        variants="runtime", model_folder=True, runtime_label="scripts.bench.report:eager_runtime_label",
        limits={"max_chars": (("max_chars",), 10_000), "max_texts": (("max_texts",), 64)},
        choose_samples=lambda config: "sentences"),
    Family(
        "tabular", handler="handlers/tabular_regressor.py", content_type="application/json",
        item_unit="rows", item_noun="row",
        metrics=(Metric("regression", data="models.tabular:diabetes_split",
                        figures="scripts.build.fidelity:tabular_figures",
                        rules="scripts.build.fidelity:REGRESSION"),),
        weights_sources=("models/weights.py", "models/tabular.py"),
        variant_sources=("models/tabular.py", "handlers/handler_kit/tabular.py",
                         "handlers/handler_kit/tabular_config.py", "handlers/handler_kit/quantization.py"),
        variants="runtime", runtime_label="scripts.bench.report:eager_runtime_label",
        limits={"max_rows": (("max_rows",), 1024)},
        choose_samples=lambda config: "diabetes_rows"),
)}

# The model the bench's foundation table (in-process vs served vs TorchServe's stock handler),
# scripts/bench/single_request.py and the fault drill use unless told otherwise.
FOUNDATION_MODEL = "efficientnet_lite0"


def metric_named(name: str) -> Metric:
    """The fidelity metric of that name, whichever family declares it."""
    for family in FAMILIES.values():
        for metric in family.metrics:
            if metric.name == name:
                return metric
    known = sorted(m.name for f in FAMILIES.values() for m in f.metrics)
    raise ValueError(f"fidelity.metric {name!r}: one of {', '.join(known)}")


def family_of(entry) -> Family:
    """The declaration of a catalog entry's family."""
    return FAMILIES[entry.family]


def samples_of(entry) -> Samples:
    """What a catalog entry is sent, chosen from its own handler config."""
    return family_of(entry).samples(entry.handler_config)
