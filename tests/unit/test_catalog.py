"""One source of truth: the archives and config.properties agree with models/catalog.yaml, and a
rebuild from the same inputs gives byte-identical archives."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import yaml

from models.catalog import CONFIG_PROPERTIES_PATH, METRICS_CONFIG_PATH, ROOT, SERVING_KEYS, parse_config_properties, render_config_properties


def read_archive(path: str, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def test_config_properties_is_generated_from_the_catalog(catalog):
    with open(CONFIG_PROPERTIES_PATH) as f:
        assert f.read() == render_config_properties(catalog), "run `make config`"
    with open(METRICS_CONFIG_PATH) as f:
        metrics = yaml.safe_load(f)
    assert f"{ROOT}/{parse_config_properties(open(CONFIG_PROPERTIES_PATH).read())['metrics_config']}" == METRICS_CONFIG_PATH
    declared = {m["name"] for kind in metrics["model_metrics"].values() for m in kind}
    assert {"HandlerInferenceMilliseconds", "HandlerRejectedInputs", "PredictionTime"} <= declared
    assert subprocess.run([sys.executable, "-m", "scripts.build.render_config", "--check"], cwd=ROOT).returncode == 0


def test_config_properties_keeps_security_defaults():
    with open(CONFIG_PROPERTIES_PATH) as f:
        props = parse_config_properties(f.read())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert "disable_token_authorization" not in props
    assert int(props["max_request_size"]) >= 12 * 1024 * 1024
    assert props["enable_model_api"] == "true"
    assert props["allowed_urls"] == ""  # registration only from the model store


def test_archives_config_properties_and_catalog_agree(catalog, model_store):
    with open(CONFIG_PROPERTIES_PATH) as f:
        props = parse_config_properties(f.read())
    served = json.loads(props["models"])
    assert sorted(props["load_models"].split(",")) == sorted(m.mar_name for m in catalog.loaded_at_start)
    assert set(served) == {m.name for m in catalog.loaded_at_start}
    for entry in catalog.models:
        mar = os.path.join(model_store, entry.mar_name)
        manifest = json.loads(read_archive(mar, "MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(read_archive(mar, "model-config.yaml"))
        assert manifest["model"]["modelName"] == entry.name
        assert manifest["model"]["modelVersion"] == entry.version
        assert {k: config[k] for k in SERVING_KEYS} == entry.serving
        if entry.load_at_start:
            assert served[entry.name][entry.version] == {"defaultVersion": entry.is_default,
                                                         "marName": entry.mar_name, **entry.serving}
        handler = dict(config["handler"])
        meta = handler.pop("meta")
        assert meta["name"] == entry.name and meta["version"] == entry.version
        assert meta["variant"] == entry.variant
        if entry.family == "text":  # a model folder, no serialized file
            assert "serializedFile" not in manifest["model"] and "labels" not in handler
            assert read_archive(mar, f"{handler['model']['path']}/model.safetensors")
            assert handler == entry.handler_config
            continue
        assert handler.pop("labels", None) == ("labels.json" if entry.labels else None)
        weights = handler["model"].pop("weights")
        assert manifest["model"]["serializedFile"] == weights
        kind = (entry.transform or {}).get("kind")
        expected_format = {None: "state_dict", "torchscript": "torchscript", "int8_x86": "torchscript",
                           "onnx": "onnx"}[kind]
        assert handler["model"].pop("format", "state_dict") == expected_format
        assert handler["model"].pop("quantization", "none") == ("int8_x86" if kind == "int8_x86" else "none")
        assert handler == entry.handler_config
        if entry.transform or entry.variant != "fp32":  # the gate's figures travel with the archive
            assert json.loads(read_archive(mar, "fidelity.json"))["reference"] == entry.base
            assert meta["fidelity"]["samples"] >= 64


def test_versions_of_one_model_are_served_side_by_side(catalog):
    digits = catalog.versions("digits")
    assert [m.version for m in digits] == ["1.0", "2.0"]
    assert [m.mar_name for m in digits] == ["digits.mar", "digits_v2.0.mar"]
    assert catalog.model("digits").version == catalog.default_versions()["digits"] == "1.0"
    with open(CONFIG_PROPERTIES_PATH) as f:
        served = json.loads(parse_config_properties(f.read())["models"])["digits"]
    assert list(served) == ["1.0", "2.0"]  # the default first: TorchServe makes the first loaded the default
    assert [v["defaultVersion"] for v in served.values()] == [True, False]


def test_catalog_errors_name_the_key(tmp_path):
    from models.catalog import CatalogError, load_catalog
    with open(os.path.join(ROOT, "models", "catalog.yaml")) as f:
        raw = yaml.safe_load(f)
    cases = [(lambda m: m.update(family="audio"), "family 'audio' must be one of image, text, tabular"),
             (lambda m: m.update(default_version="9.9"), "default_version '9.9' is not one of"),
             (lambda m: m["versions"].append({"version": "3.0", "wieghts": {}}), "unknown key 'wieghts'"),
             (lambda m: m["versions"].append({"version": "2.0"}), "must be unique"),
             # one vocabulary of variant names: amp/compiled were bf16/torchscript under other names
             (lambda m: m["variants"][0].update(variant="amp"),
              "'amp' does not name what the variant does; call it 'bf16'"),
             (lambda m: m["variants"].append({"variant": "compiled", "transform": {"kind": "torchscript"}}),
              "call it 'torchscript'")]
    for mutate, message in cases:
        broken = json.loads(json.dumps(raw))
        mutate(next(m for m in broken["models"] if m["name"] == "digits"))
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(broken))
        try:
            load_catalog(str(path))
        except CatalogError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"no CatalogError for {message}")


def test_recorded_hashes_match_the_archives(catalog, model_store):
    sums = dict(reversed(line.split()) for line in open(os.path.join(model_store, "SHA256SUMS")))
    for entry in catalog.models:
        digest = hashlib.sha256(open(os.path.join(model_store, entry.mar_name), "rb").read()).hexdigest()
        assert sums[entry.mar_name] == digest


def test_rebuild_from_scratch_is_byte_identical(model_store, tmp_path):
    """Retrain the digits model (fresh weights, not the cache) and archive it again elsewhere."""
    subprocess.run([sys.executable, "-m", "scripts.build.build_archives", "--only", "digits",
                    "--force-weights", "--export-path", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    rebuilt = open(tmp_path / "digits.mar", "rb").read()
    assert rebuilt == open(os.path.join(model_store, "digits.mar"), "rb").read()
