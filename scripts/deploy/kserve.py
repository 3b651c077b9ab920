"""KServe deployment on the project's own runtime: a ClusterServingRuntime that runs the project's
serving image, a model repository laid out for it (config.properties and archives), and the
InferenceServices that name that runtime, all derived from models/catalog.yaml.

    python -m scripts.deploy.kserve [--out build/kserve] [--storage-uri pvc://claim/path | gs://bucket/path]
                             [--image IMAGE] [--canary-version [MODEL=]VERSION] [--bench FILE]
                             [--rehearse]
    python -m scripts.deploy.kserve --record-bench build/bench/latest.json   (figures -> docs/results/bench.json,
                                                                       capacity sheet -> docs/deployment-k8s.md)
    python -m scripts.deploy.kserve --serve-runtime CONFIG [--http-port 8080] (what the runtime's container runs)

writes  <out>/clusterservingruntime.yaml              (the runtime: apply once per cluster)
        <out>/model-repo/config/config.properties   (what the runtime starts TorchServe with)
        <out>/model-repo/model-store/*.mar           (hard links to model_store's archives)
        <out>/inferenceservice-cpu.yaml, <out>/inferenceservice-gpu.yaml
        <out>/model-repo-canary/... and <out>/inferenceservice-canary.yaml (with --canary-version)
        <out>/capacity.md                             (replicas per request rate, recorded bench)
and prints what to run next. ``--rehearse`` then runs the runtime's command locally against the
written layout (ports and paths rewritten) and sends one v1 request per model.

How the runtime (deploy.runtime of the catalog; its container CONTAINER) runs a model repository:
  - KServe puts the InferenceService's storageUri at /mnt/models (a PVC mounted there, or the
    storage initializer's copy) and starts the runtime's container, the project's serving image
    (scripts/deploy/k8s.py IMAGE, built from the Dockerfile), with
    ``python3 -m scripts.deploy.kserve --serve-runtime /mnt/models/config/config.properties``;
  - that command (serve_runtime) starts ``torchserve --start --foreground`` with the repository's
    config.properties and TS_SERVICE_ENVELOPE=kserve (protocol v1) from the runtime's env, which
    TorchServe reads because the config sets enable_envvars_config=true; TorchServe listens on
    127.0.0.1:8085 (inference and management) and 0.0.0.0:8082 (metrics);
  - once every model of the config's model_snapshot has a READY worker, it starts the v1 wrapper
    (run_wrapper: a KServe ModelServer from the kserve SDK in the image) on 8080, the pod's only
    declared port, forwarding /v1/models/<name>:predict to TorchServe; it stops both on SIGTERM
    and exits 1 when either exits on its own, so that the container is restarted.
InferenceServices run in KServe's Standard (raw Kubernetes) deployment mode: a Deployment, a
Service and a HorizontalPodAutoscaler per InferenceService, no Knative (see DEPLOYMENT_MODES).

This module is the command, the runtime's config.properties and the model repository; the rest is
in scripts/deploy/kserve_common.py (facts, deploy settings, what is served), kserve_manifests.py (the
runtime and InferenceServices, checked against the SDK), kserve_capacity.py (replicas from the
recorded bench) and kserve_runtime.py (the container's command and the local rehearsal, whose
request per model is its family's, models/families.py).
"""
import argparse
import base64
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import requests
import yaml

from models.catalog import ROOT, MODEL_STORE, Catalog, ModelEntry, load_catalog
from scripts.serving.ts_server import TorchServe
# The parts (kserve_common, _manifests, _capacity, _runtime); names the tests, scripts/deploy/k8s.py and
# the runtime's wrapper process import from here are re-exported.
from scripts.deploy.kserve_common import (CAPACITY_DOC, DeployError, HTTP_PORT, METRICS_PORT, MOUNT, RECORDED_BENCH,  # noqa: F401
                                   RUNTIME_COMMAND, SERVE_START_TIMEOUT_S, deploy_settings,
                                   kserve_models_property, parse_canary, project_image, read_properties,
                                   runtime_settings, served_entries)
from scripts.deploy.kserve_manifests import (canary_name, canary_storage_uri, check_manifest, check_runtime_serves,  # noqa: F401
                                      cluster_serving_runtime, lost_in_round_trip, runtime_args, services,
                                      to_sdk_model, write_manifest)
from scripts.deploy.kserve_capacity import (BENCH_HEADER, SERVED_FIGURES, capacity_block, capacity_markdown,  # noqa: F401
                                     committed_capacity_block, load_bench, record_bench, recorded_figures,
                                     replicas_for_mix, replicas_needed, served_throughputs)
from scripts.deploy.kserve_runtime import (RuntimeRehearsal, _say, image_instance, rehearsal_config, rehearse,  # noqa: F401
                                    run_wrapper, serve_runtime, v1_predict)


CONFIG_HEADER = """\
# Generated by `python -m scripts.deploy.kserve` from models/catalog.yaml. Do not edit by hand.
# For the project's ClusterServingRuntime (clusterservingruntime.yaml): its container runs
# python3 -m scripts.deploy.kserve --serve-runtime with this file from the storageUri at /mnt/models,
# which starts TorchServe with it; the runtime sets TS_SERVICE_ENVELOPE (kserve for protocol v1),
# read through enable_envvars_config. The v1 wrapper serves the pod's port 8080 and forwards
# /v1/models/NAME:predict to TorchServe on 127.0.0.1 port 8085.
# Token authorization is off (disable_token_authorization): the wrapper and the readiness check
# call TorchServe without a key, and kubelet probes cannot carry one. No key file is written.
# TorchServe listens on 127.0.0.1 only, so its management API is unreachable from outside the
# pod; clients and probes reach the wrapper on 8080 (GET /v1/models/NAME says whether NAME is
# ready), and requests are authenticated in front of KServe (ingress, gateway or mesh).
# Metrics (Prometheus text) are on 0.0.0.0 port 8082 for the runtime's scrape annotations.
# batchSize is 1: under the kserve envelope TorchServe must not batch separate requests (it
# would answer only the first of a batch, the rest fail with 503). Send several instances in
# one request to batch them: the handler runs them as one batch.
# Each model serves one version (its default): the v1 path names no version; a new version goes
# out as a canary InferenceService (inferenceservice-canary.yaml).
"""


def render_kserve_config(catalog: Catalog, entries: Sequence[ModelEntry]) -> str:
    """config.properties for the runtime. No comment line holds '=': read_properties (as KServe's
    TorchServe wrappers do) takes every line with '=' as a setting, comments included."""
    lines = [*CONFIG_HEADER.splitlines()]
    for key, value in runtime_settings(catalog).items():
        lines.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    models = kserve_models_property(entries)
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    lines.append("model_snapshot=" + json.dumps(snapshot, separators=(",", ":")))
    bad = [line for line in lines if line.startswith("#") and "=" in line]
    if bad:
        raise DeployError(f"comment lines must not hold '=' (read_properties takes them as settings): {bad[0]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The model repository


def link_or_copy(source: str, target: str) -> None:
    if os.path.lexists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def write_model_repo(repo: str, catalog: Catalog, entries: Sequence[ModelEntry],
                     model_store: str = MODEL_STORE) -> str:
    """<repo>/config/config.properties and <repo>/model-store/<archive>.mar for ``entries``;
    archives of earlier runs that are no longer served are removed. Returns the config path."""
    missing = [m.mar_name for m in entries if not os.path.exists(os.path.join(model_store, m.mar_name))]
    if missing:
        raise DeployError(f"archives {missing} are missing from {model_store}: run `make build`")
    config_dir, store_dir = os.path.join(repo, "config"), os.path.join(repo, "model-store")
    os.makedirs(config_dir, exist_ok=True)
    os.makedirs(store_dir, exist_ok=True)
    wanted = {m.mar_name for m in entries}
    for name in os.listdir(store_dir):
        if name not in wanted:
            os.remove(os.path.join(store_dir, name))
    for entry in entries:
        link_or_copy(os.path.join(model_store, entry.mar_name), os.path.join(store_dir, entry.mar_name))
    if catalog.server.get("metrics_config"):
        source = os.path.join(ROOT, catalog.server["metrics_config"])
        shutil.copy2(source, os.path.join(config_dir, os.path.basename(source)))
    config_path = os.path.join(config_dir, "config.properties")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(render_kserve_config(catalog, entries))
    return config_path


# ---------------------------------------------------------------------------------------------


def write_deployment(out: str, catalog: Catalog, storage_uri: str, deploy: Optional[dict] = None,
                     canary: Optional[Dict[str, str]] = None, model_store: str = MODEL_STORE,
                     log=print, image: Optional[str] = None, bench_path: str = RECORDED_BENCH) -> dict:
    """Writes the runtime, the layout and the InferenceServices under ``out``; returns what was
    written, by role. ``deploy`` (default: the catalog's) replaces the catalog's deploy block."""
    if deploy is not None:
        catalog = Catalog(server=catalog.server, models=catalog.models, deploy=deploy)
    deploy = deploy_settings(catalog)
    if deploy["protocol"] != "v1":  # the handlers take v1 instances; v2 tensors are not mapped
        raise DeployError(f"protocol {deploy['protocol']!r}: only v1 is supported (and rehearsed)")
    os.makedirs(out, exist_ok=True)
    written = {}
    runtime = cluster_serving_runtime(catalog, image)
    path = written["runtime"] = os.path.join(out, "clusterservingruntime.yaml")
    write_manifest(path, runtime, f"The project's runtime: {runtime['spec']['containers'][0]['image']} running "
                   f"{' '.join(RUNTIME_COMMAND + runtime_args())}.\nCluster-scoped: apply it once "
                   "(cluster admin); InferenceServices name it in spec.predictor.model.runtime.")
    log(f"wrote {os.path.relpath(path, ROOT)} ({runtime['metadata']['name']})")
    entries = served_entries(catalog)
    repo = os.path.join(out, "model-repo")
    written["config"] = write_model_repo(repo, catalog, entries, model_store)
    log(f"wrote {os.path.relpath(repo, ROOT)}/: config/config.properties and model-store/ "
        f"({', '.join(f'{m.name} {m.version}' for m in entries)})")
    if canary:
        canary_entries = served_entries(catalog, canary)
        written["canary_config"] = write_model_repo(os.path.join(out, "model-repo-canary"), catalog,
                                                    canary_entries, model_store)
    manifests = services(catalog, storage_uri, canary)
    notes = {"cpu": f"CPU replicas ({deploy['deployment_mode']} mode: Deployment, Service, HPA on CPU use).",
             "gpu": "GPU replicas, the same repository; alternative to inferenceservice-cpu.yaml (same name).\n"
                    "HPA on CPU use: the Standard mode has no concurrency metric (Knative's).",
             "canary": f"Canary: {', '.join(f'{n} {v}' for n, v in (canary or {}).items())}, as its own "
                       f"InferenceService beside {deploy['name']}\n(Standard mode has no revisions to split "
                       "traffic between): send it a share of the requests in front."}
    for kind, manifest in manifests.items():
        check_runtime_serves(runtime, manifest)
        path = written[kind] = os.path.join(out, f"inferenceservice-{kind}.yaml")
        write_manifest(path, manifest, notes[kind])
        log(f"wrote {os.path.relpath(path, ROOT)}")
    try:
        sheet = capacity_markdown(load_bench(bench_path), entries, deploy["capacity_rates"], deploy["headroom"])
    except DeployError as exc:
        log(f"capacity sheet skipped: {exc}")
    else:
        path = written["capacity"] = os.path.join(out, "capacity.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(sheet)
        log(f"wrote {os.path.relpath(path, ROOT)} (from {os.path.relpath(bench_path, ROOT)})")
    return written


def upload_commands(local: str, storage_uri: str) -> List[str]:
    scheme, _, rest = storage_uri.partition("://")
    if scheme == "gs":
        return [f"gsutil -m rsync -r -d {local} {storage_uri}"]
    if scheme == "s3":
        return [f"aws s3 sync --delete {local} {storage_uri}"]
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        pod = {"spec": {"containers": [{"name": "copy", "image": "busybox:1.36", "command": ["sleep", "3600"],
                                        "volumeMounts": [{"name": "repo", "mountPath": "/pv"}]}],
                        "volumes": [{"name": "repo", "persistentVolumeClaim": {"claimName": claim}}]}}
        return [f"kubectl run model-repo-copy --image=busybox:1.36 --restart=Never --overrides='{json.dumps(pod)}'",
                "kubectl wait --for=condition=Ready pod/model-repo-copy",
                f"kubectl exec model-repo-copy -- sh -c 'rm -rf /pv/{sub}/config /pv/{sub}/model-store; mkdir -p /pv/{sub}'",
                f"kubectl cp {local}/. model-repo-copy:/pv/{sub}",
                "kubectl delete pod model-repo-copy"]
    return [f"# copy {local}/ to {storage_uri} (config/ and model-store/ at its top)"]


def next_steps(out: str, storage_uri: str, deploy: dict, written: dict, image: Optional[str] = None) -> str:
    rel = os.path.relpath(out, ROOT)
    name = deploy["name"]
    image = image or project_image()
    steps = ["", "Next:", f"  # 1. the serving image ({image}: make image, then push) and the runtime (once per cluster)",
             f"  kubectl apply -f {rel}/clusterservingruntime.yaml"]
    steps += ["  # 2. upload the model repository"] + [f"  {c}" for c in upload_commands(f"{rel}/model-repo", storage_uri)]
    steps += ["  # 3. deploy (or inferenceservice-gpu.yaml) and wait",
              f"  kubectl apply -f {rel}/inferenceservice-cpu.yaml",
              f"  kubectl wait --for=condition=Ready inferenceservice/{name} --timeout=15m",
              f"  # 4. call it: the predictor Service {name}-predictor (port 80), here through a port-forward",
              f"  kubectl port-forward service/{name}-predictor 8080:80 &",
              "  echo '{\"instances\": [{\"data\": {\"b64\": \"'$(base64 -w0 build/samples/digit_7_0.png)'\"}}]}' > digits.json",
              '  curl -H "Content-Type: application/json" http://127.0.0.1:8080/v1/models/digits:predict -d @digits.json']
    if "canary" in written:
        steps += [f"  # canary: upload model-repo-canary, apply; it runs beside {name} as {canary_name(deploy)}"]
        steps += [f"  {c}" for c in upload_commands(f"{rel}/model-repo-canary", canary_storage_uri(storage_uri))]
        steps += [f"  kubectl apply -f {rel}/inferenceservice-canary.yaml"]
    if "REGISTRY/" in image + json.dumps(deploy.get("image") or {}):
        steps += ["", "Note: the image names are placeholders (REGISTRY/...): pass --image (and set deploy.image.gpu)."]
    return "\n".join(steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "kserve"))
    parser.add_argument("--storage-uri", help="where the model repository will be: pvc://claim/path, "
                        "gs://..., s3://... (default: the catalog's deploy.storage_uri)")
    parser.add_argument("--image", help="the serving image the runtime runs (default: scripts/deploy/k8s.py IMAGE)")
    parser.add_argument("--canary-version", help="MODEL=VERSION (or VERSION): also write a canary "
                        "repository and InferenceService serving that version")
    parser.add_argument("--bench", default=RECORDED_BENCH,
                        help="bench figures for <out>/capacity.md (default: the recorded docs/results/bench.json)")
    parser.add_argument("--rehearse", action="store_true",
                        help="then run the runtime's command locally on the layout and send v1 requests")
    parser.add_argument("--record-bench", metavar="BENCH_JSON",
                        help="only copy the figures of a `make bench` result to docs/results/bench.json and "
                             "rewrite the capacity sheet of docs/deployment-k8s.md from them")
    parser.add_argument("--serve-runtime", metavar="CONFIG",
                        help="only serve the repository of CONFIG as the runtime's container does")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help="with --serve-runtime: the wrapper's port")
    args = parser.parse_args(argv)
    if args.serve_runtime:
        try:
            return serve_runtime(args.serve_runtime, args.http_port)
        except (DeployError, OSError) as exc:
            _say(f"error: {exc}")
            return 1
    try:
        catalog = load_catalog()
        if args.record_bench:
            record_bench(args.record_bench, catalog, RECORDED_BENCH, CAPACITY_DOC)
            print(f"recorded {os.path.relpath(args.record_bench, ROOT)} in {os.path.relpath(RECORDED_BENCH, ROOT)}; "
                  f"capacity sheet rewritten in {os.path.relpath(CAPACITY_DOC, ROOT)}")
            return 0
        deploy = deploy_settings(catalog)
        storage_uri = args.storage_uri or deploy["storage_uri"]
        out = os.path.abspath(args.out)
        written = write_deployment(out, catalog, storage_uri, canary=parse_canary(args.canary_version, catalog),
                                   image=args.image, bench_path=os.path.abspath(args.bench))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(next_steps(out, storage_uri, deploy, written, args.image))
    if args.rehearse:
        return rehearse(os.path.join(out, "model-repo"), os.path.join(out, "rehearsal"), catalog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
