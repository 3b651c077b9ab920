"""KServe deployment on the project's own runtime (scripts/deploy/kserve.py): the ClusterServingRuntime
and the InferenceServices that name it, checked against the kserve SDK's models and KServe's
Standard-mode rules; the model repository layout and its config.properties; the capacity
arithmetic and the committed capacity sheet; the runtime's command in the container
(serve_runtime) against stand-ins; and a rehearsal: that command run on the written layout, a
real TorchServe (envelope kserve) behind the v1 wrapper, then stopped with SIGTERM."""
import copy
import glob
import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace

import psutil
import pytest
import requests
import yaml

from scripts.deploy import kserve, pods
from models.catalog import ROOT, Catalog, models_property, parse_config_properties
from scripts.deploy.kserve import DeployError

STORAGE_URI = "gs://bucket/models/image-models"
# KServe's built-in TorchServe runtime and its image, being removed: named nowhere (spelled in
# parts so that this file does not name them either).
RETIRED = ("kserve-" + "torchserve", "pytorch/torchserve" + "-kfs")


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


def load_manifest(written, kind) -> dict:
    with open(written[kind], encoding="utf-8") as f:
        return yaml.safe_load(f)


def with_deploy(catalog, **changes) -> Catalog:
    return replace(catalog, deploy={**copy.deepcopy(catalog.deploy), **changes})


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
    return Catalog(server=catalog.server, models=[*catalog.models, extra], deploy=catalog.deploy)


def test_canary_is_its_own_inference_service_serving_the_new_version(catalog, model_store, tmp_path):
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
    canary, cpu = load_manifest(written, "canary"), load_manifest(written, "cpu")
    # Standard mode has no revisions: a second InferenceService beside the stable one, same runtime.
    assert canary["metadata"]["name"] == cpu["metadata"]["name"] + "-canary"
    assert canary["metadata"]["annotations"] == cpu["metadata"]["annotations"]
    predictor = canary["spec"]["predictor"]
    replicas = catalog.deploy["canary_replicas"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (replicas, replicas)
    assert predictor["model"]["storageUri"] == STORAGE_URI + "-canary"
    assert predictor["model"]["runtime"] == cpu["spec"]["predictor"]["model"]["runtime"]
    for manifest in (canary, cpu):
        assert "canaryTrafficPercent" not in manifest["spec"]["predictor"]
        kserve.check_manifest(manifest)


@pytest.mark.parametrize("value, message", [("digits=7.7", "no version '7.7'"),
                                            ("nosuch=1.0", "not served at start"),
                                            ("7.7", "no model served at start")])
def test_canary_of_an_unknown_version_is_refused(catalog, value, message):
    with pytest.raises(DeployError, match=message):
        kserve.served_entries(catalog, kserve.parse_canary(value, catalog))


# -- the project's ClusterServingRuntime ---------------------------------------------------------

def test_runtime_on_disk_is_a_valid_cluster_serving_runtime(deployment, catalog):
    from kserve.models import V1alpha1ClusterServingRuntime
    runtime = load_manifest(deployment[1], "runtime")
    obj = kserve.check_manifest(runtime)
    assert isinstance(obj, V1alpha1ClusterServingRuntime)
    assert (obj.api_version, obj.kind) == ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    assert obj.metadata.name == catalog.deploy["runtime"]
    assert runtime == kserve.cluster_serving_runtime(catalog)
    spec = runtime["spec"]
    assert spec["supportedModelFormats"] == [{"name": catalog.deploy["model_format"], "autoSelect": False}]
    assert spec["protocolVersions"] == ["v1"] and spec["multiModel"] is False
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(kserve.METRICS_PORT)


def test_runtime_runs_the_projects_serving_image_as_its_pods_do(deployment):
    runtime = load_manifest(deployment[1], "runtime")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"          # KServe mounts the storage into it
    assert container["image"] == pods.IMAGE                   # one constant for both ways onto a cluster
    assert container["command"] + container["args"] == [
        "python3", "-m", "scripts.deploy.kserve", "--serve-runtime", "/mnt/models/config/config.properties",
        "--http-port", "8080"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TS_SERVICE_ENVELOPE"] == "kserve"
    assert (env["TMPDIR"], env["LOG_LOCATION"]) == (pods.TMP_DIR, pods.LOG_DIR)
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == security["runAsGroup"] == pods.RUN_AS
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # what TorchServe writes goes to the two emptyDirs, as in scripts/deploy/k8s.py's pods
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in runtime["spec"]["volumes"]}
    assert sorted(mounts.values()) == sorted([pods.TMP_DIR, pods.LOG_DIR]) and set(volumes) == set(mounts)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": 8080}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] \
        >= kserve.SERVE_START_TIMEOUT_S


def test_runtime_serves_the_layout_the_repository_is_written_in(deployment):
    """The runtime's argument is the config.properties of the repository at /mnt/models, and
    that config's addresses are the ports the runtime's container declares and scrapes."""
    out, written = deployment
    runtime = load_manifest(written, "runtime")
    config_arg = runtime["spec"]["containers"][0]["args"][1]
    relative = os.path.relpath(written["config"], os.path.join(out, "model-repo"))
    assert config_arg == f"{kserve.MOUNT}/{relative}"
    props = parse_config_properties(read_config(written))
    assert props["model_store"] == f"{kserve.MOUNT}/model-store"
    assert props["metrics_address"].rsplit(":", 1)[1] == runtime["spec"]["annotations"]["prometheus.kserve.io/port"]
    assert props["inference_address"] == "http://127.0.0.1:8085"  # what the wrapper forwards to


def test_runtime_image_can_be_named(catalog):
    runtime = kserve.cluster_serving_runtime(catalog, "registry.example/ts:1.2.3")
    assert runtime["spec"]["containers"][0]["image"] == "registry.example/ts:1.2.3"
    assert runtime["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"
    kserve.check_manifest(runtime)


def runtime_manifest(catalog) -> dict:
    return kserve.cluster_serving_runtime(catalog)


@pytest.mark.parametrize("path, key, value, message", [
    (["spec"], "supportedModelTypes", [{"name": "x"}], "V1alpha1ServingRuntimeSpec has no field 'supportedModelTypes'"),
    (["spec", "containers", 0], "comand", ["x"], "comand"),
    (["spec", "containers", 0, "ports", 0], "containerPort", "8080", "containerPort"),
    (["spec"], "protocolVersions", "v1", r"spec.protocolVersions: expected a list"),
    (["spec", "supportedModelFormats", 0], "autoSelect", "false", r"autoSelect: expected bool"),
])
def test_a_broken_runtime_is_caught_by_the_sdk(catalog, path, key, value, message):
    manifest = runtime_manifest(catalog)
    node = manifest
    for step in path:
        node = node[step]
    node[key] = value
    with pytest.raises(DeployError, match=message):
        kserve.check_manifest(manifest)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["spec"]["supportedModelFormats"][0].update(autoSelect=True), "autoSelect must be false"),
    (lambda m: m["spec"]["containers"][0].update(name="torchserve"), "must be named 'kserve-container'"),
    (lambda m: m["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot must be true"),
    (lambda m: m["spec"]["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
     "readOnlyRootFilesystem must be true"),
    (lambda m: m["spec"]["containers"][0].pop("readinessProbe"), "readinessProbe is missing"),
    (lambda m: m["spec"].update(supportedModelFormats=[]), "supportedModelFormats is empty"),
    (lambda m: m.update(apiVersion="serving.kserve.io/v1beta1"), "kind 'ClusterServingRuntime' in apiVersion"),
])
def test_a_runtime_against_the_projects_rules_is_refused(catalog, change, message):
    manifest = runtime_manifest(catalog)
    change(manifest)
    with pytest.raises(DeployError, match=message):
        kserve.check_manifest(manifest)


# -- InferenceService manifests against the kserve SDK --------------------------------------------

def test_manifests_on_disk_are_valid_inference_services(deployment, catalog):
    from kserve.models import V1beta1InferenceService
    served = [catalog.model(name) for name in dict.fromkeys(m.name for m in catalog.loaded_at_start)]
    runtime = load_manifest(deployment[1], "runtime")
    for kind in ("cpu", "gpu"):
        manifest = load_manifest(deployment[1], kind)
        service = kserve.check_manifest(manifest)
        kserve.check_runtime_serves(runtime, manifest)
        assert isinstance(service, V1beta1InferenceService)
        assert (service.api_version, service.kind) == ("serving.kserve.io/v1beta1", "InferenceService")
        assert service.metadata.annotations == {"serving.kserve.io/deploymentMode": catalog.deploy["deployment_mode"],
                                                "serving.kserve.io/autoscalerClass": "hpa"}
        predictor, settings = service.spec.predictor, catalog.deploy[kind]
        assert (predictor.min_replicas, predictor.max_replicas) == (settings["min_replicas"], settings["max_replicas"])
        assert (predictor.scale_metric, predictor.scale_target) == (settings["scale_metric"], settings["scale_target"])
        assert predictor.scale_metric in ("cpu", "memory")  # the HPA's metrics; concurrency is Knative's
        assert predictor.timeout == max(m.serving["responseTimeout"] for m in served)
        assert predictor.termination_grace_period_seconds == \
            pods.DRAIN_SLEEP_S + max(m.serving["responseTimeout"] for m in served) + pods.STOP_MARGIN_S
        assert manifest["spec"]["predictor"]["deploymentStrategy"] == {
            "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        model = predictor.model
        assert model.model_format.name == catalog.deploy["model_format"] and model.protocol_version == "v1"
        assert model.runtime == catalog.deploy["runtime"] == runtime["metadata"]["name"]
        assert model.storage_uri == STORAGE_URI
        assert model.image == (catalog.deploy["image"]["gpu"] if kind == "gpu" else None)  # CPU: the runtime's
        assert model.resources.limits == settings["resources"]["limits"]
        assert (model.resources.limits.get("nvidia.com/gpu") == "1") == (kind == "gpu")
        assert predictor.canary_traffic_percent is None


def test_the_retired_builtin_runtime_is_named_nowhere(deployment, catalog, model_store, tmp_path):
    """KServe's built-in TorchServe runtime and its image are being removed: nothing generated,
    nor the catalog, the scripts or the tests may depend on them."""
    out, _ = deployment
    canaried = with_extra_version(catalog, "digits", "9.9")
    kserve.write_deployment(str(tmp_path), canaried, STORAGE_URI, catalog.deploy, canary={"digits": "9.9"}, log=quiet)
    generated = [p for folder in (out, str(tmp_path)) for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if p.endswith((".yaml", ".properties", ".md"))]
    assert len([p for p in generated if p.endswith(".yaml")]) >= 7  # runtime, cpu, gpu, twice; canary
    sources = [os.path.join(ROOT, "models", "catalog.yaml"), *glob.glob(os.path.join(ROOT, "scripts", "**", "*.py"), recursive=True),
               *glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True), *glob.glob(os.path.join(ROOT, "deploy", "**", "*"),
                                                                       recursive=True),
               kserve.RECORDED_BENCH, kserve.CAPACITY_DOC]
    found = []
    for path in generated + [p for p in sources if os.path.isfile(p)]:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        found += [f"{os.path.relpath(path, ROOT)}: {name}" for name in RETIRED if name in text]
    assert found == []


def cpu_manifest(catalog) -> dict:
    return kserve.services(catalog, STORAGE_URI)["cpu"]


@pytest.mark.parametrize("path, bad_key, message", [
    (["spec", "predictor"], "minReplica", "V1beta1PredictorSpec has no field 'minReplica'"),
    (["spec", "predictor", "model"], "canaryTrafficPercent", "V1beta1ModelSpec has no field 'canaryTrafficPercent'"),
    (["spec", "predictor", "model", "resources"], "limit", "V1ResourceRequirements has no field 'limit'"),
    (["spec"], "predicter", "V1beta1InferenceServiceSpec has no field 'predicter'"),
    (["spec", "predictor", "deploymentStrategy", "rollingUpdate"], "maxSurges", "maxSurges"),
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


@pytest.mark.parametrize("change, message", [
    (lambda p, a: p.update(canaryTrafficPercent=10), "canaryTrafficPercent needs Knative"),
    (lambda p, a: p.update(scaleMetric="concurrency", scaleTarget=16), "concurrency and rps need Knative"),
    (lambda p, a: p.update(scaleMetric="rps"), "scaleMetric 'rps'"),
    (lambda p, a: p.update(scaleTarget=150), "scaleTarget 150"),
    (lambda p, a: p.update(minReplicas=0), "does not scale to zero"),
    (lambda p, a: p.update(minReplicas=5, maxReplicas=2), "maxReplicas 2 is below minReplicas 5"),
    (lambda p, a: p.update(containerConcurrency=4), "containerConcurrency is a Knative setting"),
    (lambda p, a: a.pop("serving.kserve.io/deploymentMode"), "deploymentMode is None"),
    (lambda p, a: a.update({"serving.kserve.io/deploymentMode": "Serverless"}), "deploymentMode is 'Serverless'"),
    (lambda p, a: a.pop("serving.kserve.io/autoscalerClass"), "autoscalerClass must be 'hpa'"),
    (lambda p, a: p["model"].pop("runtime"), "model.runtime is missing"),
    (lambda p, a: p["model"].pop("storageUri"), "storageUri is missing"),
])
def test_an_inference_service_against_standard_mode_is_refused(catalog, change, message):
    manifest = cpu_manifest(catalog)
    change(manifest["spec"]["predictor"], manifest["metadata"]["annotations"])
    with pytest.raises(DeployError, match=message):
        kserve.check_manifest(manifest)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(runtime=RETIRED[0]), "names the runtime"),
    (lambda m: m.update(modelFormat={"name": "pytorch"}), "model format 'pytorch' is not one the runtime supports"),
    (lambda m: m.update(protocolVersion="v2"), "protocol 'v2' is not one the runtime speaks"),
])
def test_an_inference_service_the_runtime_cannot_serve_is_refused(catalog, change, message):
    manifest = cpu_manifest(catalog)
    runtime = runtime_manifest(catalog)
    kserve.check_runtime_serves(runtime, manifest)
    change(manifest["spec"]["predictor"]["model"])
    with pytest.raises(DeployError, match=message):
        kserve.check_runtime_serves(runtime, manifest)


def test_the_legacy_raw_deployment_name_can_be_chosen(catalog, model_store, tmp_path):
    legacy = with_deploy(catalog, deployment_mode="RawDeployment")
    written = kserve.write_deployment(str(tmp_path), legacy, STORAGE_URI, log=quiet)
    for kind in ("cpu", "gpu"):
        annotations = load_manifest(written, kind)["metadata"]["annotations"]
        assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"


@pytest.mark.parametrize("changes, message", [
    ({"deployment_mode": "Serverless"}, "deploy.deployment_mode 'Serverless'"),
    ({"deployment_mode": None}, "deploy.deployment_mode None"),
    ({"image": {"cpu": "REGISTRY/other:1", "gpu": "g"}}, "deploy.image.cpu"),
    ({"protocol": "v3"}, "deploy.protocol 'v3'"),
])
def test_deploy_settings_the_runtime_cannot_honour_are_refused(catalog, changes, message):
    with pytest.raises(DeployError, match=message):
        kserve.services(with_deploy(catalog, **changes), STORAGE_URI)


def test_catalog_changes_reach_the_manifests(catalog):
    changed = with_deploy(catalog, runtime="ts-other", model_format="ts-format",
                          gpu={**catalog.deploy["gpu"], "scale_metric": "memory", "scale_target": 2048})
    runtime = kserve.cluster_serving_runtime(changed)
    gpu = kserve.services(changed, STORAGE_URI)["gpu"]
    kserve.check_manifest(runtime)
    kserve.check_manifest(gpu)
    kserve.check_runtime_serves(runtime, gpu)
    assert runtime["metadata"]["name"] == gpu["spec"]["predictor"]["model"]["runtime"] == "ts-other"
    assert gpu["spec"]["predictor"]["model"]["modelFormat"] == {"name": "ts-format"}
    assert (gpu["spec"]["predictor"]["scaleMetric"], gpu["spec"]["predictor"]["scaleTarget"]) == ("memory", 2048)


def test_round_trip_reports_what_the_sdk_drops_or_changes():
    original = {"a": {"b": 1, "c": [1, "2"]}, "d": True}
    assert kserve.lost_in_round_trip(original, copy.deepcopy(original)) == []
    assert kserve.lost_in_round_trip(original, {**copy.deepcopy(original), "extra": 0}) == []
    assert kserve.lost_in_round_trip(original, {"a": {"b": 1, "c": [1, 2]}}) == ["$.a.c[1]: '2' -> 2", "$.d (dropped)"]


def test_manifests_are_written_without_yaml_aliases(deployment):
    for kind in ("runtime", "cpu", "gpu"):
        with open(deployment[1][kind], encoding="utf-8") as f:
            text = f.read()
        assert "&id" not in text and "*id" not in text
        assert text.startswith("# Generated by `python -m scripts.deploy.kserve`")


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


def bench_result(catalog) -> dict:
    """A `make bench` result as scripts/bench/report.py writes it (the fields the recording reads, and
    others it must leave out)."""
    lite = catalog.model("efficientnet_lite0")
    served = {"title": "t", "unit": "img", "throughput_items_s": 48.0, "throughput_img_s": 48.0, "p50_ms": 323.1,
              "p99_ms": 516.4, "items_ok": 720, "measured_s": 15.0, "errors": 0, "foreign_cpu_cores": 0.01,
              "failure": None, "settings": {"archive": lite.mar_name}, "answers": {"china.jpg": "palace"},
              "top1": {"china.jpg": "palace"}, "images_ok": 720}
    return {"started": "2026-01-02T03:04:05+00:00", "seconds": 15.0, "concurrency": 16, "cpu_count": 2,
            "machine": "test box, 2 usable cores", "torch": "2.14.1", "families": ["image"], "python": "3.11",
            "variants": {"a": {}}, "ratios": [],
            "archive_variants": {"efficientnet_lite0": [
                {"variant": "fp32", "archive": lite.mar_name, "in_process": {"x": 1}, "served": served},
                {"variant": "onnx", "archive": "efficientnet_lite0_onnx.mar", "in_process": {"x": 1},
                 "served": {**served, "throughput_items_s": 101.3}},
                {"variant": "broken", "archive": "efficientnet_lite0_broken.mar", "served": None}]}}


DOC = "# A page\n\nBefore.\n\n<!-- capacity:start -->\nold sheet\n<!-- capacity:end -->\n\nAfter.\n"


def test_recording_copies_the_figures_the_sheet_needs_and_rewrites_the_sheet(catalog, tmp_path):
    source, dest, doc = tmp_path / "latest.json", tmp_path / "results" / "bench.json", tmp_path / "page.md"
    source.write_text(json.dumps(bench_result(catalog)))
    doc.write_text(DOC)
    figures = kserve.record_bench(str(source), catalog, str(dest), str(doc))
    recorded = json.loads(dest.read_text())
    assert recorded == figures
    assert set(recorded) == {"recorded_from", *kserve.BENCH_HEADER, "archive_variants"}
    rows = recorded["archive_variants"]["efficientnet_lite0"]
    assert [r["variant"] for r in rows] == ["fp32", "onnx"]  # the row without served figures is left out
    assert set(rows[0]["served"]) == set(kserve.SERVED_FIGURES)  # no answers, settings, titles
    text = doc.read_text()
    assert text.startswith("# A page\n\nBefore.\n\n<!-- capacity:start -->\n") and text.endswith(
        "<!-- capacity:end -->\n\nAfter.\n") and "old sheet" not in text
    block = kserve.committed_capacity_block(str(doc))
    assert block == kserve.capacity_block(catalog, str(dest))
    assert "| efficientnet_lite0 1.0 | efficientnet_lite0.mar | 48.0 | 1 | 2 | 3 | 15 | 30 |" in block
    # the recorded file records again to the same figures and sheet
    again = tmp_path / "again.json"
    kserve.record_bench(str(dest), catalog, str(again), str(doc))
    assert json.loads(again.read_text()) == recorded and kserve.committed_capacity_block(str(doc)) == block


def test_recording_refuses_what_gives_no_sheet(catalog, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(DOC)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"started": "t"}))
    with pytest.raises(DeployError, match="no served rows"):
        kserve.record_bench(str(empty), catalog, str(tmp_path / "out.json"), str(doc))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"archive_variants": {"x": [{"archive": "x.mar", "served": {"throughput_items_s": 1}}]}}))
    with pytest.raises(DeployError, match="no served figures for the models served at start"):
        kserve.record_bench(str(other), catalog, str(tmp_path / "out.json"), str(doc))
    with pytest.raises(DeployError, match="is missing"):
        kserve.record_bench(str(tmp_path / "none.json"), catalog, str(tmp_path / "out.json"), str(doc))
    assert not (tmp_path / "out.json").exists() and doc.read_text() == DOC
    source = tmp_path / "latest.json"
    source.write_text(json.dumps(bench_result(catalog)))
    doc.write_text("# no markers\n")
    with pytest.raises(DeployError, match="needs one <!-- capacity:start -->"):
        kserve.record_bench(str(source), catalog, str(tmp_path / "out.json"), str(doc))


def test_a_failed_row_gives_no_throughput(catalog):
    bench = bench_result(catalog)
    bench["archive_variants"]["efficientnet_lite0"][0]["served"]["failure"] = "server died"
    assert kserve.served_throughputs(bench, kserve.served_entries(catalog)) == {}


def test_committed_capacity_sheet_is_what_the_tool_writes_from_the_recorded_results(catalog):
    """docs/deployment-k8s.md's sheet comes from docs/results/bench.json: re-record after a new
    `make bench` (python -m scripts.deploy.kserve --record-bench build/bench/latest.json)."""
    recorded = kserve.load_bench(kserve.RECORDED_BENCH)
    assert recorded == kserve.recorded_figures(recorded, recorded["recorded_from"])  # only what it copies
    block = kserve.committed_capacity_block()
    assert block == kserve.capacity_block(catalog), "run python -m scripts.deploy.kserve --record-bench docs/results/bench.json"
    measured = kserve.served_throughputs(recorded, kserve.served_entries(catalog))
    assert "efficientnet_lite0" in measured and measured["efficientnet_lite0"] > 0


def test_make_kserve_writes_the_sheet_from_the_recorded_results(deployment, catalog):
    with open(deployment[1]["capacity"], encoding="utf-8") as f:
        assert f.read() == kserve.capacity_block(catalog)


def test_record_bench_from_the_command_line(catalog, tmp_path, monkeypatch):
    source, dest, doc = tmp_path / "latest.json", tmp_path / "bench.json", tmp_path / "page.md"
    source.write_text(json.dumps(bench_result(catalog)))
    doc.write_text(DOC)
    monkeypatch.setattr(kserve, "RECORDED_BENCH", str(dest))
    monkeypatch.setattr(kserve, "CAPACITY_DOC", str(doc))
    assert kserve.main(["--record-bench", str(source)]) == 0
    assert json.loads(dest.read_text())["archive_variants"] and "| efficientnet_lite0 1.0 |" in doc.read_text()
    assert kserve.main(["--record-bench", str(tmp_path / "none.json")]) == 1


# -- the runtime's command, against stand-ins for torchserve (no Java) ------------------------------

def stand_in(tmp_path, body: str) -> dict:
    """An environment whose `torchserve` is a shell script: ``body`` handles --start; --stop
    kills what --start left running (its pid in $TMPDIR/standin.pid)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "torchserve"
    script.write_text("#!/bin/sh\n"
                      'if [ "$1" = "--stop" ]; then kill "$(cat "$TMPDIR/standin.pid")" 2>/dev/null; exit 0; fi\n'
                      'echo $$ > "$TMPDIR/standin.pid"\n' + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp),
            "LOG_LOCATION": str(tmp_path / "logs"), "TS_SERVICE_ENVELOPE": "kserve", "PYTHONPATH": ROOT}


def serve(env: dict, config: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.deploy.kserve", *kserve.runtime_args(config, 1)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def repo_config(deployment, tmp_path) -> str:
    path = tmp_path / "config.properties"
    path.write_text(kserve.rehearsal_config(read_config(deployment[1]), os.path.join(deployment[0], "model-repo")))
    return str(path)


def test_the_runtime_command_exits_1_when_torchserve_exits_before_its_models_are_ready(tmp_path, repo_config):
    result = serve(stand_in(tmp_path, "exit 0"), repo_config)
    assert result.returncode == 1, result.stderr
    assert "TorchServe exited (0) before its models were ready" in result.stderr


def test_the_runtime_command_gives_up_when_the_models_are_not_ready_in_time(tmp_path, repo_config):
    env = {**stand_in(tmp_path, "exec sleep 300"), "SERVE_START_TIMEOUT": "3"}
    started = time.monotonic()
    result = serve(env, repo_config)
    assert result.returncode == 1 and "models not ready after 3 s" in result.stderr, result.stderr
    assert time.monotonic() - started < 40  # and `torchserve --stop` ended the stand-in
    pid = int((tmp_path / "tmp" / "standin.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_runtime_command_needs_the_runtimes_envelope(tmp_path, repo_config):
    env = stand_in(tmp_path, "exit 0")
    del env["TS_SERVICE_ENVELOPE"]
    result = serve(env, repo_config)
    assert result.returncode == 2 and "TS_SERVICE_ENVELOPE" in result.stderr


def test_the_runtime_command_refuses_a_config_it_did_not_write(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:1\nmanagement_address=http://127.0.0.1:1\n")
    with pytest.raises(DeployError, match="no model_snapshot"):
        kserve.serve_runtime(str(config))


# -- rehearsal: the runtime's command on the layout: TorchServe behind the v1 wrapper ----------------

@pytest.fixture(scope="module")
def runtime(deployment, tmp_path_factory, torchserve_factory):
    out, _ = deployment
    server = kserve.RuntimeRehearsal(str(tmp_path_factory.mktemp("kserve-runtime")),
                                     os.path.join(out, "model-repo"))
    with torchserve_factory.running(server):
        yield server


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


@pytest.mark.integration
def test_the_runtime_command_exits_1_when_torchserve_dies(catalog, model_store, tmp_path, torchserve_factory):
    """The container must restart when TorchServe goes away: the runtime's command stops the
    wrapper and exits 1 (a digits-only repository, so that it starts quickly)."""
    repo = tmp_path / "repo"
    kserve.write_model_repo(str(repo), catalog, [catalog.model("digits")], model_store)
    with torchserve_factory.running(kserve.RuntimeRehearsal(str(tmp_path / "home"), str(repo))) as server:
        process = server._runtime
        java = psutil.Process(server.pid())
        workers = java.children(recursive=True)
        try:
            assert requests.get(f"{server.wrapper_url}/v1/models/digits", timeout=10).json()["ready"] is True
            java.kill()
            assert process.wait(60) == 1
            with open(os.path.join(server.home, "logs", "runtime.log"), errors="replace") as f:
                assert "TorchServe exited on its own" in f.read()
            with pytest.raises(requests.ConnectionError):
                requests.get(server.wrapper_url + "/", timeout=5)  # the wrapper went with it
        finally:
            server.stop()
            for worker in psutil.wait_procs(workers, timeout=10)[1]:
                worker.kill()


@pytest.mark.integration
def test_sigterm_stops_the_runtime_command_and_torchserve(runtime):
    """Last of the module (it stops the shared runtime): SIGTERM, as the kubelet sends after the
    preStop sleep, stops the wrapper and TorchServe and exits 0."""
    java = psutil.Process(runtime.pid())
    runtime.stop()
    assert runtime.exit_code == 0
    assert not java.is_running() or java.status() == psutil.STATUS_ZOMBIE
    assert runtime.pid() is None
    with pytest.raises(requests.ConnectionError):
        requests.get(runtime.wrapper_url + "/", timeout=5)
