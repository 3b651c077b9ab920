"""KServe deployment (scripts/kserve.py): the model repository layout and its config.properties,
the InferenceService manifests checked against the kserve SDK's models, the capacity arithmetic,
and a rehearsal: a real TorchServe started from the written layout as KServe's TorchServe runtime
starts it (envelope kserve), behind a KServe ModelServer forwarding the v1 protocol as the
runtime image's wrapper does."""
import copy
import json
import os
import threading
from dataclasses import replace

import pytest
import requests
import yaml

from scripts import kserve
from scripts.catalog import Catalog, models_property, parse_config_properties
from scripts.kserve import DeployError

STORAGE_URI = "gs://bucket/models/image-models"


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def deployment(catalog, model_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kserve"))
    written = kserve.write_deployment(out, catalog, STORAGE_URI, catalog.deploy, log=quiet)
    return out, written


def read_config(written) -> str:
    with open(written["config"], encoding="utf-8") as f:
        return f.read()


def snapshot_of(text: str) -> dict:
    return json.loads(kserve.read_properties(text)["model_snapshot"])


# -- layout and config.properties ---------------------------------------------------------------

def test_layout_holds_the_config_and_the_archives_served_at_start(deployment, catalog, model_store):
    out, written = deployment
    repo = os.path.join(out, "model-repo")
    assert written["config"] == os.path.join(repo, "config", "config.properties")
    served = {catalog.model(m.name).mar_name for m in catalog.loaded_at_start}
    assert set(os.listdir(os.path.join(repo, "model-store"))) == served
    for mar in served:
        assert os.path.samefile(os.path.join(repo, "model-store", mar), os.path.join(model_store, mar))


def test_config_has_what_the_runtime_and_its_wrapper_need(deployment, catalog):
    text = read_config(deployment[1])
    # TorchServe's reader and the wrapper's (every line with '=', comments included) agree.
    props = parse_config_properties(text)
    assert kserve.read_properties(text) == props
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["enable_envvars_config"] == "true"           # TS_SERVICE_ENVELOPE from the runtime
    assert props["disable_token_authorization"] == "true"     # the wrapper and probes have no key
    assert props["enable_model_api"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["enable_metrics_api"] == "true"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["max_request_size"] == str(catalog.server["max_request_size"])
    assert "load_models" not in props  # model_snapshot says what is loaded
    snapshot_line = [line for line in text.splitlines() if line.startswith("model_snapshot=")]
    assert len(snapshot_line) == 1 and not snapshot_line[0].endswith("\\")


def test_model_snapshot_serves_each_models_default_version_with_catalog_settings(deployment, catalog):
    snapshot = snapshot_of(read_config(deployment[1]))
    names = list(dict.fromkeys(m.name for m in catalog.loaded_at_start))
    assert list(snapshot["models"]) == names and snapshot["modelCount"] == len(names)
    for name in names:
        entry = catalog.model(name)  # the default version
        catalog_json = models_property([entry])[name][entry.version]
        assert snapshot["models"][name] == {entry.version: {**catalog_json, "defaultVersion": True, "batchSize": 1}}
        for key in ("minWorkers", "maxWorkers", "maxBatchDelay", "responseTimeout"):
            assert snapshot["models"][name][entry.version][key] == entry.serving[key]


def test_comment_lines_hold_no_equals_sign(deployment, catalog, monkeypatch):
    text = read_config(deployment[1])
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments and not any("=" in line for line in comments)
    monkeypatch.setattr(kserve, "CONFIG_HEADER", "# batchSize=1 for the envelope\n")
    with pytest.raises(DeployError, match="must not hold '='"):
        kserve.render_kserve_config(catalog, kserve.served_entries(catalog))


def test_a_second_run_removes_archives_no_longer_served(catalog, model_store, tmp_path):
    out = str(tmp_path)
    kserve.write_deployment(out, catalog, STORAGE_URI, catalog.deploy, log=quiet)
    stale = os.path.join(out, "model-repo", "model-store", "retired.mar")
    with open(stale, "wb") as f:
        f.write(b"old")
    kserve.write_deployment(out, catalog, STORAGE_URI, catalog.deploy, log=quiet)
    assert not os.path.exists(stale)


def with_extra_version(catalog, name: str, version: str) -> Catalog:
    """The catalog plus another version of ``name`` (same archive), not loaded at start."""
    extra = replace(catalog.model(name), version=version, load_at_start=False)
    return Catalog(server=catalog.server, models=[*catalog.models, extra])


def test_canary_repository_serves_the_new_version_as_default(catalog, model_store, tmp_path):
    canaried = with_extra_version(catalog, "digits", "9.9")
    assert kserve.parse_canary("digits=9.9", canaried) == {"digits": "9.9"}
    assert kserve.parse_canary("9.9", canaried) == {"digits": "9.9"}
    written = kserve.write_deployment(str(tmp_path), canaried, STORAGE_URI, catalog.deploy,
                                      canary={"digits": "9.9"}, log=quiet)
    with open(written["canary_config"], encoding="utf-8") as f:
        models = snapshot_of(f.read())["models"]
    assert list(models["digits"]) == ["9.9"] and models["digits"]["9.9"]["defaultVersion"] is True
    stable = snapshot_of(read_config(written))["models"]
    assert list(stable["digits"]) == [catalog.model("digits").version]
    assert {k: v for k, v in models.items() if k != "digits"} == {k: v for k, v in stable.items() if k != "digits"}
    with open(written["canary"], encoding="utf-8") as f:
        canary = yaml.safe_load(f)
    with open(written["cpu"], encoding="utf-8") as f:
        cpu = yaml.safe_load(f)
    assert canary["metadata"]["name"] == cpu["metadata"]["name"]  # a new revision of the same service
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == catalog.deploy["canary_traffic_percent"]
    assert canary["spec"]["predictor"]["model"]["storageUri"] == STORAGE_URI + "-canary"
    assert "canaryTrafficPercent" not in cpu["spec"]["predictor"]


@pytest.mark.parametrize("value, message", [("digits=7.7", "no version '7.7'"),
                                            ("nosuch=1.0", "not served at start"),
                                            ("7.7", "no model served at start")])
def test_canary_of_an_unknown_version_is_refused(catalog, value, message):
    with pytest.raises(DeployError, match=message):
        kserve.served_entries(catalog, kserve.parse_canary(value, catalog))


# -- InferenceService manifests against the kserve SDK --------------------------------------------

def load_manifest(written, kind) -> dict:
    with open(written[kind], encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_manifests_on_disk_are_valid_inference_services(deployment, catalog):
    from kserve.models import V1beta1InferenceService
    served = [catalog.model(name) for name in dict.fromkeys(m.name for m in catalog.loaded_at_start)]
    for kind in ("cpu", "gpu"):
        service = kserve.check_manifest(load_manifest(deployment[1], kind))
        assert isinstance(service, V1beta1InferenceService)
        assert (service.api_version, service.kind) == ("serving.kserve.io/v1beta1", "InferenceService")
        predictor, settings = service.spec.predictor, catalog.deploy[kind]
        assert (predictor.min_replicas, predictor.max_replicas) == (settings["min_replicas"], settings["max_replicas"])
        assert (predictor.scale_metric, predictor.scale_target) == (settings["scale_metric"], settings["scale_target"])
        assert predictor.timeout == max(m.serving["responseTimeout"] for m in served)
        model = predictor.model
        assert model.model_format.name == "pytorch" and model.protocol_version == "v1"
        assert model.runtime == "kserve-torchserve" and model.storage_uri == STORAGE_URI
        assert model.image == catalog.deploy["image"][kind]
        assert model.resources.limits == settings["resources"]["limits"]
        assert (model.resources.limits.get("nvidia.com/gpu") == "1") == (kind == "gpu")
        assert predictor.canary_traffic_percent is None


def cpu_manifest(catalog) -> dict:
    entries = kserve.served_entries(catalog)
    return kserve.inference_service("svc", STORAGE_URI, "image:tag", catalog.deploy["cpu"],
                                     kserve.request_timeout_s(entries))


@pytest.mark.parametrize("path, bad_key, message", [
    (["spec", "predictor"], "minReplica", "V1beta1PredictorSpec has no field 'minReplica'"),
    (["spec", "predictor", "model"], "canaryTrafficPercent", "V1beta1ModelSpec has no field 'canaryTrafficPercent'"),
    (["spec", "predictor", "model", "resources"], "limit", "V1ResourceRequirements has no field 'limit'"),
    (["spec"], "predicter", "V1beta1InferenceServiceSpec has no field 'predicter'"),
])
def test_a_misspelled_field_is_caught(catalog, path, bad_key, message):
    manifest = cpu_manifest(catalog)
    kserve.check_manifest(manifest)
    node = manifest
    for key in path:
        node = node[key]
    node[bad_key] = 1
    with pytest.raises(DeployError, match=message):
        kserve.check_manifest(manifest)


@pytest.mark.parametrize("key, value", [("minReplicas", "1"), ("canaryTrafficPercent", True),
                                        ("maxReplicas", 2.5)])
def test_a_value_of_the_wrong_type_is_caught(catalog, key, value):
    manifest = cpu_manifest(catalog)
    manifest["spec"]["predictor"][key] = value
    with pytest.raises(DeployError, match=f"predictor.{key}: expected int"):
        kserve.check_manifest(manifest)


def test_a_missing_required_field_is_caught_by_the_sdk(catalog):
    manifest = cpu_manifest(catalog)
    del manifest["spec"]["predictor"]
    with pytest.raises(DeployError, match="predictor"):
        kserve.check_manifest(manifest)


def test_round_trip_reports_what_the_sdk_drops_or_changes():
    original = {"a": {"b": 1, "c": [1, "2"]}, "d": True}
    assert kserve.lost_in_round_trip(original, copy.deepcopy(original)) == []
    assert kserve.lost_in_round_trip(original, {**copy.deepcopy(original), "extra": 0}) == []
    assert kserve.lost_in_round_trip(original, {"a": {"b": 1, "c": [1, 2]}}) == ["$.a.c[1]: '2' -> 2", "$.d (dropped)"]


# -- capacity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, throughput, headroom, replicas", [
    (0, 24.0, 0.3, 1), (16.8, 24.0, 0.3, 1), (16.9, 24.0, 0.3, 2), (100, 24.0, 0.3, 6),
    (7, 10, 0.3, 1), (1000, 415.25, 0.3, 4), (48, 24.0, 0.0, 2), (48, 24.0, 0.5, 4)])
def test_replicas_needed(rate, throughput, headroom, replicas):
    assert kserve.replicas_needed(rate, throughput, headroom) == replicas


@pytest.mark.parametrize("args", [(10, 0, 0.3), (10, 24, 1.0), (10, 24, -0.1), (-1, 24, 0.3)])
def test_replicas_needed_refuses_meaningless_figures(args):
    with pytest.raises(ValueError):
        kserve.replicas_needed(*args)


def test_replicas_for_a_traffic_mix_add_the_fractions_of_a_replica():
    # 12 of 24/s is half a replica, 200 of 400/s another half: one replica at full use
    assert kserve.replicas_for_mix({"r": 12, "d": 200}, {"r": 24, "d": 400}, 0.0) == 1
    assert kserve.replicas_for_mix({"r": 12, "d": 200}, {"r": 24, "d": 400}, 0.3) == 2


def test_capacity_sheet_from_bench_figures(catalog):
    entries = kserve.served_entries(catalog)
    efficientnet_lite0 = catalog.model("efficientnet_lite0")
    bench = {"machine": "test box", "cpu_count": 2, "concurrency": 16, "seconds": 15, "started": "t",
             "archive_variants": {"efficientnet_lite0": [
                 {"archive": efficientnet_lite0.mar_name, "served": {"throughput_img_s": 20.0}},
                 {"archive": "efficientnet_lite0_int8.mar", "served": {"throughput_img_s": 99.0}}]}}
    assert kserve.served_throughputs(bench, entries) == {"efficientnet_lite0": 20.0}
    sheet = kserve.capacity_markdown(bench, entries, [10, 100], 0.3)
    row = [line for line in sheet.splitlines() if line.startswith("| efficientnet_lite0")]
    assert row == [f"| efficientnet_lite0 {efficientnet_lite0.version} | {efficientnet_lite0.mar_name} | 20.0 | 1 | 8 |"]
    assert "test box" in sheet and "Not measured by the benchmark" in sheet  # digits has no row


def test_upload_commands_follow_the_storage_uri():
    assert kserve.upload_commands("r", "gs://b/p") == ["gsutil -m rsync -r -d r gs://b/p"]
    assert kserve.upload_commands("r", "s3://b/p") == ["aws s3 sync --delete r s3://b/p"]
    pvc = kserve.upload_commands("r", "pvc://claim/sub/dir")
    assert '"claimName": "claim"' in pvc[0] and "kubectl cp r/. model-repo-copy:/pv/sub/dir" in pvc


# -- rehearsal: TorchServe from the layout, behind the v1 wrapper -------------------------------------

@pytest.fixture(scope="module")
def runtime(deployment, tmp_path_factory):
    out, _ = deployment
    server = kserve.RuntimeRehearsal(str(tmp_path_factory.mktemp("kserve-runtime")),
                                     os.path.join(out, "model-repo"))
    try:
        server.start()
        yield server
    except Exception:
        print(server.log_tail())
        raise
    finally:
        server.stop()


def digits_instances(samples, count):
    _, _, images, labels = samples.digits_split()
    return [kserve.image_instance(samples.png_bytes(p)) for p in images[:count]], [str(l) for l in labels[:count]]


@pytest.mark.integration
def test_served_from_the_snapshot_without_a_key(runtime, catalog):
    assert requests.get(f"{runtime.inference_url}/ping", timeout=10).json() == {"status": "Healthy"}
    assert not os.path.exists(os.path.join(runtime.cwd, "key_file.json"))
    for name in runtime.models:  # what the wrapper's readiness check asks, without a key
        described = requests.get(f"{runtime.management_url}/models/{name}", timeout=10).json()[0]
        assert described["modelVersion"] == catalog.model(name).version and described["batchSize"] == 1
        assert any(w["status"] == "READY" for w in described["workers"])
    refused = requests.post(f"{runtime.management_url}/models", params={"url": "digits.mar"}, timeout=10)
    assert refused.status_code == 405  # enable_model_api=false: nothing is registered at run time


@pytest.mark.integration
def test_wrapper_reports_every_model_ready(runtime):
    for name in runtime.models:
        assert requests.get(f"{runtime.wrapper_url}/v1/models/{name}", timeout=10).json() == {"name": name, "ready": True}


def top1(response) -> list:
    assert response.status_code == 200, response.text
    return [prediction[0]["label"] for prediction in response.json()["predictions"]]


@pytest.mark.integration
def test_v1_predict_digits_instances_in_one_request(runtime, samples):
    instances, labels = digits_instances(samples, 6)
    response = kserve.v1_predict(runtime.wrapper_url, "digits", instances)
    predictions = response.json()["predictions"]
    assert len(predictions) == len(instances)
    assert all(len(p) == 3 and 0 < p[0]["probability"] <= 1 for p in predictions)
    one_by_one = [top1(kserve.v1_predict(runtime.wrapper_url, "digits", [i]))[0] for i in instances]
    assert top1(response) == one_by_one  # one prediction per instance, in order
    assert sum(a == b for a, b in zip(one_by_one, labels)) >= 5  # held-out accuracy is about 99%


@pytest.mark.integration
def test_v1_predict_a_photograph(runtime, samples):
    response = kserve.v1_predict(runtime.wrapper_url, "efficientnet_lite0", [kserve.image_instance(samples.photo_bytes()[0])])
    assert response.status_code == 200, response.text
    [top5] = response.json()["predictions"]
    assert len(top5) == 5 and top5[0]["label"]


@pytest.mark.integration
def test_concurrent_requests_all_succeed(runtime, samples):
    """TorchServe must not batch separate requests under the kserve envelope (batchSize 1):
    with the catalog's batchSize 8 these would all fail with 503."""
    instances, labels = digits_instances(samples, 8)
    results = [None] * len(instances)
    barrier = threading.Barrier(len(instances))

    def send(i):
        barrier.wait()
        results[i] = kserve.v1_predict(runtime.wrapper_url, "digits", [instances[i]])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * len(instances)
    assert sum(top1(r) == [label] for r, label in zip(results, labels)) >= len(labels) - 1


@pytest.mark.integration
def test_metrics_port_serves_prometheus_text(runtime):
    response = requests.get(f"{runtime.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert any(line.startswith("# TYPE ") for line in response.text.splitlines())


@pytest.mark.integration
def test_v1_instance_with_a_base64_string(runtime, samples):
    """TorchServe's KServe examples send {"data": "<base64>"} per instance."""
    instances, labels = digits_instances(samples, 1)
    response = kserve.v1_predict(runtime.wrapper_url, "digits", [{"data": instances[0]["data"]["b64"]}])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["label"] == labels[0]


@pytest.mark.integration
def test_a_bad_instance_is_answered_in_place(runtime, samples):
    instances, labels = digits_instances(samples, 2)
    instances.insert(1, {"data": {"b64": "%%%"}})
    response = kserve.v1_predict(runtime.wrapper_url, "digits", instances)
    assert response.status_code == 200, response.text
    good, bad, other = response.json()["predictions"]
    assert (good[0]["label"], other[0]["label"]) == tuple(labels)
    assert bad["code"] == 400 and "not valid base64" in bad["message"]
