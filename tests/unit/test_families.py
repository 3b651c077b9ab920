"""A family is declared once (models/families.py): every catalog model's family is declared and
provides every part the tools read, and no module outside the declaration branches on a family
or a model name."""
import inspect
import os
import re

import pytest

from models.families import FAMILIES, SAMPLES, Family, family_of, metric_named, resolve, samples_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECLARATION = os.path.join("models", "families.py")


def bases(catalog):
    """One entry per catalog model: its default version's fp32 archive."""
    return [m for m in catalog.models if m.is_default and m.variant == "fp32"]


def test_every_catalog_model_has_a_declared_family(catalog):
    for entry in catalog.models:
        assert entry.family in FAMILIES, f"{entry.name}: family {entry.family!r} is not declared"
        family = family_of(entry)
        assert isinstance(family, Family) and family.name == entry.family
        assert entry.handler == family.handler, f"{entry.name}: handler {entry.handler} is not its family's"
        assert entry.fidelity["metric"] in family.metric_names, entry.name


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_family_declares_every_part(name):
    family = FAMILIES[name]
    assert os.path.isfile(os.path.join(ROOT, family.handler))
    assert family.content_type and family.item_unit and family.item_noun
    assert family.metrics and family.variants in ("transform", "runtime")
    assert bool(family.transforms) == (family.variants == "transform")
    for path in (*family.weights_sources, *family.variant_sources):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    assert callable(resolve(family.runtime_label))
    for metric in family.metrics:
        if metric.data != "labelled":
            assert callable(resolve(metric.data)), metric
        if family.variants == "runtime":
            assert metric.figures and callable(resolve(metric.figures)), metric
        rules = resolve(metric.rules)  # its gate and how its figures read
        assert callable(rules.gate) and callable(rules.cell) and rules.header, metric


def test_fidelity_metric_names_are_unique_and_each_finds_its_gate():
    names = [m.name for f in FAMILIES.values() for m in f.metrics]
    assert len(names) == len(set(names))
    for name in names:
        assert metric_named(name).name == name
    with pytest.raises(ValueError, match="one of accuracy, agreement, embedding, regression"):
        metric_named("psnr")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_declare_every_part(name):
    samples = SAMPLES[name]
    for part in ("bench", "drill", "good", "cases", "rehearsal"):
        assert callable(resolve(getattr(samples, part))), f"{name}.{part}"
    assert samples.labelled is None or callable(resolve(samples.labelled))
    signature = inspect.signature(resolve(samples.cases))
    assert list(signature.parameters) == ["model", "limits", "max_request_size"]


def test_each_model_gets_its_parts_from_its_declaration(catalog):
    """Inputs, bad-input cases, good requests, the fidelity measure of its catalog metric and the
    rehearsal input, all from the family and the model's own handler config."""
    for entry in bases(catalog):
        family, samples = family_of(entry), samples_of(entry)
        bodies = resolve(samples.bench)()
        assert bodies and all(isinstance(b, bytes) for b in bodies.values()), entry.name
        assert resolve(samples.drill)(), entry.name
        limits = family.handler_limits(entry.handler_config)
        cases = resolve(samples.cases)(entry.name, limits, 1000)
        assert cases and {c.model for c in cases} == {entry.name}, entry.name
        goods = resolve(samples.good)(entry.name)
        assert goods and {g.model for g in goods} == {entry.name}, entry.name
        metric = family.metric(entry.fidelity["metric"])
        if metric.data == "labelled":  # accuracy: the model's own samples carry labels
            assert samples.labelled, f"{entry.name}: {metric.name} needs labelled samples"
        resolve(samples.rehearsal)()  # an instance, or None: a readiness check


def test_samples_are_chosen_from_the_handler_config(catalog):
    chosen = {entry.name: samples_of(entry).name for entry in bases(catalog)}
    assert chosen == {"efficientnet_lite0": "photos", "digits": "digits", "minilm": "sentences",
                      "diabetes": "diabetes_rows"}


def test_declared_limit_defaults_are_the_handlers(catalog):
    """The limits a family's cases are built around: where the catalog leaves one out, the
    declared default must be the handler's own."""
    from handler_kit.image_config import parse_image_classifier
    from handler_kit.tabular_config import parse_tabular_regressor
    from handler_kit.text_config import parse_text_embedder
    parsers = {"image": parse_image_classifier, "text": parse_text_embedder, "tabular": parse_tabular_regressor}
    for entry in bases(catalog):
        family = family_of(entry)
        # the handler section as the archive's model-config.yaml holds it
        config = entry.model_config(None if family.model_folder else "weights.pt",
                                    "labels.json" if entry.labels else None, {})["handler"]
        for path, _ in family.limits.values():  # what the handler gets where the catalog says nothing
            section = config
            for key in path[:-1]:
                section = section[key]
            section.pop(path[-1], None)
        parsed = parsers[entry.family](config)
        for name, (path, default) in family.limits.items():
            value = parsed
            for key in path:
                value = getattr(value, key)
            assert value == default, f"{entry.family}: {name} declared default {default}, the handler's {value}"


def test_fidelity_accuracy_measures_the_models_own_labelled_samples(catalog):
    from scripts.build.build_archives import evaluation_data
    digits = next(e for e in bases(catalog) if e.fidelity["metric"] == "accuracy")
    inputs, labels = evaluation_data(digits)
    assert labels is not None and len(labels) == len(inputs) > 100


# -- nothing else branches on a family or a model name -------------------------------------------
# The patterns of issue 11's grep; a family name as a mapping key is also a container's "image"
# (Kubernetes), a Grafana variable's "text", or a JSON body a test case sends.
PATTERNS = re.compile(r'family ==|family !=|"image":|"text":|"tabular":|== "digits"|== "minilm"'
                      r'|== "diabetes"|efficientnet_lite0"'
                      r'|== "(accuracy|agreement|embedding|regression)"')  # fidelity metrics: Metric.gate
NOT_A_FAMILY = re.compile(r'"image": (image|"busybox)|"text": \["All"\]|b\'\{"text": "hello"\}\'|"tf_efficientnet_lite0"')


def test_no_module_outside_the_declaration_branches_on_a_family_or_model_name(catalog):
    names = "|".join(re.escape(m.name) for m in bases(catalog))
    by_name = re.compile(rf'(==|!=)\s*"({names})"|"({names})"\s*(==|!=)|\.(base|name) in \(')
    found = []
    for folder in ("scripts", "models"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in sorted(files):
                path = os.path.join(dirpath, file)
                relative = os.path.relpath(path, ROOT)
                if not file.endswith(".py") or relative == DECLARATION:
                    continue
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if (PATTERNS.search(line) and not NOT_A_FAMILY.search(line)) or by_name.search(line):
                            found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "branches on a family or model name outside models/families.py:\n" + "\n".join(found)


def test_a_catalog_entry_without_a_handler_gets_its_familys(tmp_path):
    import yaml

    from models.catalog import CATALOG_PATH, load_catalog
    with open(CATALOG_PATH, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    for model in raw["models"]:
        model.pop("handler")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    for entry in load_catalog(str(path)).models:
        assert entry.handler == FAMILIES[entry.family].handler, entry.name
