"""Builds model_store/<name>.mar for the models declared in models/catalog.yaml.

For each model (each version and variant): produce (or reuse) its weights (a state_dict or
checkpoint, or for the text family a model folder) and labels, stage the handler, its handler_kit
package and the model-config.yaml derived from the catalog, run torch-model-archiver, then rewrite
the archive deterministically (sorted entries, fixed timestamps) so that a rebuild from the same
inputs gives a byte-identical .mar. SHA-256 sums of the archives go to model_store/SHA256SUMS.

    python -m scripts.build.build_archives [--only ARCHIVE ...] [--force-weights]
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
import zipfile

import yaml

from models.families import FAMILIES, family_of, resolve, samples_of
from models.catalog import CATALOG_PATH, MODEL_STORE, ROOT, ModelEntry, load_catalog
from scripts.build.fidelity import FidelityError
from scripts.build.in_process import importable

BUILD_DIR = os.path.join(ROOT, "build")
HANDLER_KIT = os.path.join(ROOT, "handlers", "handler_kit")
WEIGHTS_FILE = "weights.pt"
ARTIFACTS = {"torchscript": ("model.pt", {"format": "torchscript"}),
             "int8_x86": ("model.pt", {"format": "torchscript", "quantization": "int8_x86"}),
             "onnx": ("model.onnx", {"format": "onnx"})}
# What each family's weights and variant figures are made from: a change rebuilds them
# (declared in models/families.py).
WEIGHTS_SOURCES = {name: f.weights_sources for name, f in FAMILIES.items()}
VARIANT_SOURCES = {name: f.variant_sources for name, f in FAMILIES.items()}
LABELS_FILE = "labels.json"
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FIXED_CREATED_ON = "01/01/1980 00:00:00"
SUMS_FILE = "SHA256SUMS"


def log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _builder_inputs_key(entry: ModelEntry, source: dict) -> str:
    """Weights are rebuilt only when what makes them changes."""
    digest = hashlib.sha256(json.dumps([source, entry.handler_config.get("model"),
                                        entry.handler_config.get("image")], sort_keys=True).encode())
    for path in (*WEIGHTS_SOURCES[entry.family], *entry.model_files):
        with open(os.path.join(ROOT, path), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def produce_weights(entry: ModelEntry, out_dir: str, force: bool) -> dict:
    """Write out_dir/weights.pt and return the meta that goes into the archive."""
    import torch

    target = os.path.join(out_dir, WEIGHTS_FILE)
    source = entry.weights
    if "file" in source:
        path = os.path.join(ROOT, source["file"])
        state = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
        if not isinstance(state, dict):
            raise SystemExit(f"{source['file']}: expected a state_dict, got {type(state).__name__}")
        torch.save(state, target)
        return {"weights": f"user state_dict {os.path.basename(path)} (sha256 {sha256_file(path)[:16]})"}

    from models.weights import BUILDERS
    key = _builder_inputs_key(entry, source)
    cache = os.path.join(BUILD_DIR, "weights", entry.base, key)  # variants share their base's
    if force or not os.path.isfile(os.path.join(cache, WEIGHTS_FILE)):
        builder = BUILDERS[source["builder"]]
        log(f"{entry.name}: producing weights with {source['builder']} (one thread, deterministic)")
        started = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            args = {k: v for k, v in source.items() if k != "builder"}
            state, meta = builder(image=entry.handler_config.get("image"),
                                  model=entry.handler_config["model"], **args)
        finally:
            torch.set_num_threads(threads)
        os.makedirs(cache, exist_ok=True)
        torch.save(state, os.path.join(cache, WEIGHTS_FILE))
        with open(os.path.join(cache, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        log(f"{entry.name}: weights ready in {time.perf_counter() - started:.1f} s: {meta}")
    else:
        log(f"{entry.name}: reusing weights {os.path.relpath(cache, ROOT)}")
    shutil.copyfile(os.path.join(cache, WEIGHTS_FILE), target)
    with open(os.path.join(cache, "meta.json")) as f:
        return json.load(f)


def produce_model_folder(entry: ModelEntry, extra: str) -> dict:
    """Text family: the builder names a model folder (config, tokenizer, safetensors weights);
    it goes into the archive as handler.model.path."""
    from models.weights import BUILDERS
    source = entry.weights
    if "file" in source:
        folder, meta = os.path.join(ROOT, source["file"]), {"weights": f"user model folder {source['file']}"}
    else:
        args = {k: v for k, v in source.items() if k != "builder"}
        folder, meta = BUILDERS[source["builder"]](**args)
    target = os.path.join(extra, entry.handler_config["model"]["path"])
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.bin", "*.pkl"))
    return meta


def _variant_key(entry: ModelEntry, model_path: str) -> str:
    digest = hashlib.sha256(json.dumps([entry.transform, entry.fidelity, entry.handler_config],
                                       sort_keys=True).encode())
    paths = [os.path.join(ROOT, p) for p in ("scripts/build/fidelity.py", *VARIANT_SOURCES[entry.family])]
    if os.path.isdir(model_path):
        paths += [os.path.join(model_path, n) for n in sorted(os.listdir(model_path))
                  if os.path.isfile(os.path.join(model_path, n))]
    else:
        paths.append(model_path)
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def produce_variant(entry: ModelEntry, stage_dir: str, model_path: str) -> tuple:
    """Make the variant's artifact from the fp32 model at model_path and pass it through the
    fidelity gate (figures cached by what they depend on). Returns (artifact file name or None,
    handler.model overrides, fidelity figures)."""
    from scripts.build import fidelity

    kind = (entry.transform or {}).get("kind")
    artifact, overrides = ARTIFACTS.get(kind, (WEIGHTS_FILE, {}))
    if family_of(entry).model_folder:
        artifact = None
    cache = os.path.join(BUILD_DIR, "variants", entry.name, _variant_key(entry, model_path))
    if os.path.isfile(os.path.join(cache, "fidelity.json")):
        log(f"{entry.name}: reusing {kind or entry.variant} artifact and its fidelity figures")
        if artifact not in (None, WEIGHTS_FILE):
            shutil.copyfile(os.path.join(cache, artifact), os.path.join(stage_dir, artifact))
        with open(os.path.join(cache, "fidelity.json")) as f:
            return artifact, overrides, json.load(f)

    if family_of(entry).variants == "transform":
        figures = _image_variant(entry, stage_dir, kind, artifact, overrides)
    else:  # runtime-only variants (dtype, quantization): measured as the handler will run them
        measure = resolve(family_of(entry).metric(entry.fidelity["metric"]).figures)
        figures = measure(model_path, entry.handler_config, entry.fidelity)
    log(f"{entry.name}: fidelity against fp32: {figures}")
    fidelity.check(entry.fidelity, figures, entry.name)  # raises FidelityError: not packaged
    os.makedirs(cache, exist_ok=True)
    if artifact not in (None, WEIGHTS_FILE):
        shutil.copyfile(os.path.join(stage_dir, artifact), os.path.join(cache, artifact))
    with open(os.path.join(cache, "fidelity.json"), "w") as f:
        json.dump(figures, f, indent=2)
    return artifact, overrides, figures


def evaluation_data(entry: ModelEntry):
    """(inputs, labels or None) a transform variant's metric is computed on, as its family
    declares it (models/families.py): the held-out labelled data of the model's own samples
    (accuracy), or the metric's data set (agreement: views of the photographs)."""
    metric = family_of(entry).metric(entry.fidelity["metric"])
    image = entry.handler_config["image"]
    if metric.data == "labelled":
        labelled = samples_of(entry).labelled
        if labelled is None:
            raise FidelityError(f"{entry.name}: fidelity metric {metric.name} needs labelled data, and "
                                f"the {samples_of(entry).name} samples have none")
        return resolve(labelled)(image)
    return resolve(metric.data)(entry.fidelity, image), None


def _image_variant(entry: ModelEntry, stage_dir: str, kind, artifact: str, overrides: dict) -> dict:
    """Transform the fp32 state_dict (TorchScript, int8, ONNX) and measure it against fp32."""
    import torch
    from handler_kit import runtime
    from handler_kit.image_config import check_model_runtime, parse_model, parse_runtime
    from models import variants
    from scripts.build import fidelity

    config, image = entry.handler_config, entry.handler_config["image"]
    cpu = torch.device("cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic calibration and export, so rebuilds are identical
    try:
        fp32 = runtime.build_model(config["model"]["module"], config["model"]["factory"],
                                   config["model"].get("kwargs", {}),
                                   os.path.join(stage_dir, WEIGHTS_FILE), cpu, channels_last=False)
        inputs, labels = evaluation_data(entry)
        example = inputs[:2]
        started = time.perf_counter()
        if kind == "torchscript":
            channels_last = config.get("runtime", {}).get("channels_last", True)
            torch.jit.save(variants.to_torchscript(fp32, example, channels_last),
                           os.path.join(stage_dir, artifact))
        elif kind == "int8_x86":
            transform = entry.transform
            calibration = variants.calibration_batches(transform.get("calibration", "none"), image,
                                                       int(transform.get("calibration_images", 128)))
            quantized = variants.quantize_int8_x86(fp32, calibration, example,
                                                   transform.get("float_modules", ()))
            torch.jit.save(quantized, os.path.join(stage_dir, artifact))
        elif kind == "onnx":
            variants.export_onnx(fp32, example, os.path.join(stage_dir, artifact))
        if kind:
            log(f"{entry.name}: {kind} artifact made in {time.perf_counter() - started:.1f} s")

        model_spec = parse_model({**config["model"], **overrides, "weights": artifact})
        runtime_spec = parse_runtime(config.get("runtime"))
        check_model_runtime(model_spec, runtime_spec)
        runner = runtime.load_runner(model_spec, runtime_spec, stage_dir, cpu, threads=1)
        reference = runtime.EagerRunner(fp32, cpu, "float32", compile_model=False)
        channels_last = runtime_spec.channels_last and model_spec.format != "onnx"
        return fidelity.measure(entry.fidelity, fidelity.run_all(reference, inputs, False),
                                fidelity.run_all(runner, inputs, channels_last), labels)
    finally:
        torch.set_num_threads(threads)


def produce_labels(entry: ModelEntry, out_dir: str) -> None:
    source = entry.labels
    if "file" in source:
        with open(os.path.join(ROOT, source["file"]), encoding="utf-8") as f:
            labels = json.load(f)
    else:
        from models.weights import BUILDERS
        labels = BUILDERS[source["builder"]](**{k: v for k, v in source.items() if k != "builder"})
    with open(os.path.join(out_dir, LABELS_FILE), "w", encoding="utf-8") as f:
        json.dump(labels, f, indent=0)


def normalize_archive(path: str) -> None:
    """Rewrite a .mar with sorted entries, fixed timestamps and a fixed createdOn."""
    with zipfile.ZipFile(path) as src:
        entries = {name: src.read(name) for name in src.namelist()}
    manifest_name = "MAR-INF/MANIFEST.json"
    manifest = json.loads(entries[manifest_name])
    manifest["createdOn"] = FIXED_CREATED_ON
    entries[manifest_name] = json.dumps(manifest, indent=4, sort_keys=True).encode()
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, entries[name])
    os.replace(tmp, path)


def stage(entry: ModelEntry, force_weights: bool) -> tuple:
    """Lay out everything the archive holds; returns (stage folder, serialized file name or None)."""
    stage_dir = os.path.join(BUILD_DIR, "stage", entry.mar_name[:-len(".mar")])
    shutil.rmtree(stage_dir, ignore_errors=True)
    extra = os.path.join(stage_dir, "extra")
    os.makedirs(extra)
    if family_of(entry).model_folder:
        meta = produce_model_folder(entry, extra)
        artifact, model_path = None, os.path.join(extra, entry.handler_config["model"]["path"])
    else:
        meta = produce_weights(entry, stage_dir, force_weights)
        artifact, model_path = WEIGHTS_FILE, os.path.join(stage_dir, WEIGHTS_FILE)
    if entry.labels:
        produce_labels(entry, extra)
    shutil.copytree(HANDLER_KIT, os.path.join(extra, "handler_kit"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for model_file in entry.model_files:
        shutil.copy(os.path.join(ROOT, model_file), extra)
    overrides = {}
    if entry.transform or entry.variant != "fp32":
        artifact, overrides, figures = produce_variant(entry, stage_dir, model_path)
        meta["fidelity"] = figures
        with open(os.path.join(extra, "fidelity.json"), "w") as f:
            json.dump({"reference": entry.base, **figures}, f, indent=2)
    with open(os.path.join(stage_dir, "model-config.yaml"), "w", encoding="utf-8") as f:
        f.write("# Generated by scripts/build/build_archives.py from models/catalog.yaml; do not edit.\n")
        yaml.safe_dump(entry.model_config(artifact, LABELS_FILE if entry.labels else None, meta,
                                          overrides), f, sort_keys=False)
    return stage_dir, artifact


def archive(entry: ModelEntry, stage_dir: str, artifact, export_path: str) -> str:
    """torch-model-archiver names its output <model name>.mar: it writes into the stage folder,
    and the archive is moved to its catalog file name (versions share a model name)."""
    os.makedirs(export_path, exist_ok=True)
    out_dir = os.path.join(stage_dir, "out")
    command = [os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
               "--model-name", entry.name, "--version", entry.version,
               "--handler", os.path.join(ROOT, entry.handler),
               "--extra-files", os.path.join(stage_dir, "extra"),
               "--config-file", os.path.join(stage_dir, "model-config.yaml"),
               "--export-path", out_dir, "--force"]
    if artifact:
        command += ["--serialized-file", os.path.join(stage_dir, artifact)]
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run(command, check=True, cwd=ROOT)
    mar = os.path.join(export_path, entry.mar_name)
    normalize_archive(os.path.join(out_dir, f"{entry.name}.mar"))
    shutil.move(os.path.join(out_dir, f"{entry.name}.mar"), mar)
    return mar


def update_sums(export_path: str, built: dict, declared: set) -> None:
    """SHA256SUMS of the archives the catalog declares (a --only build keeps the others' sums)."""
    sums_path = os.path.join(export_path, SUMS_FILE)
    sums = {}
    if os.path.isfile(sums_path):
        with open(sums_path) as f:
            for line in f:
                digest, _, name = line.strip().partition("  ")
                if name:
                    sums[name] = digest
    sums.update(built)
    sums = {name: digest for name, digest in sums.items() if name in declared}
    with open(sums_path, "w") as f:
        f.writelines(f"{sums[name]}  {name}\n" for name in sorted(sums))


def write_samples() -> str:
    """Real sample inputs for the README's curl and the client: the two photographs that ship
    with scikit-learn and a few held-out digits as 8-bit PNGs (digit_<label>_<n>.png)."""
    from models import sample_data
    folder = os.path.join(BUILD_DIR, "samples")
    os.makedirs(folder, exist_ok=True)
    for path in sample_data.photo_paths():
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    _, _, images, labels = sample_data.digits_split()
    for n, (pixels, label) in enumerate(zip(images[:10], labels[:10])):
        with open(os.path.join(folder, f"digit_{label}_{n}.png"), "wb") as f:
            f.write(sample_data.png_bytes(pixels))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ARCHIVE",
                        help="build only these archives (file stems: digits, digits_v2.0, minilm_int8)")
    parser.add_argument("--force-weights", action="store_true", help="rebuild cached weights")
    parser.add_argument("--export-path", default=MODEL_STORE)
    parser.add_argument("--catalog", default=CATALOG_PATH, help="default: models/catalog.yaml")
    args = parser.parse_args(argv)
    catalog = load_catalog(args.catalog)
    entries = [catalog.archive(n) for n in args.only] if args.only else catalog.models
    built, refused = {}, []
    for i, entry in enumerate(entries, 1):
        started = time.perf_counter()
        log(f"({i}/{len(entries)}) {entry.name} {entry.version} [{entry.variant}]")
        # The entry's model files are top-level modules in its archive (handler.model.module:
        # digits_cnn, a user's pebble): weights, variants and fidelity import them by that name.
        model_dirs = sorted({os.path.dirname(os.path.join(ROOT, f)) for f in entry.model_files})
        try:
            with importable(*model_dirs):
                stage_dir, artifact = stage(entry, args.force_weights)
        except FidelityError as exc:
            log(f"REFUSED {exc}")
            refused.append(entry.name)
            continue
        mar = archive(entry, stage_dir, artifact, args.export_path)
        built[os.path.basename(mar)] = sha256_file(mar)
        log(f"{entry.name}: {os.path.relpath(mar, ROOT)} ({os.path.getsize(mar) / 1e6:.1f} MB, "
            f"sha256 {built[os.path.basename(mar)][:16]}) in {time.perf_counter() - started:.1f} s")
    update_sums(args.export_path, built, {m.mar_name for m in catalog.models})
    log(f"sample inputs in {os.path.relpath(write_samples(), ROOT)}")
    if refused:
        log(f"refused by the fidelity gate: {', '.join(refused)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
