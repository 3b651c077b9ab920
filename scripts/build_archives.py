"""Builds model_store/<name>.mar for the models declared in models/catalog.yaml.

For each model: produce (or reuse) its weights and labels, stage the handler, its handler_kit
package and the model-config.yaml derived from the catalog, run torch-model-archiver, then rewrite
the archive deterministically (sorted entries, fixed timestamps) so that a rebuild from the same
inputs gives a byte-identical .mar. SHA-256 sums of the archives go to model_store/SHA256SUMS.

    python -m scripts.build_archives [--only NAME ...] [--force-weights]
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import yaml

from scripts.catalog import MODEL_STORE, ROOT, ModelEntry, load_catalog

BUILD_DIR = os.path.join(ROOT, "build")
HANDLER_KIT = os.path.join(ROOT, "handlers", "handler_kit")
WEIGHTS_FILE = "weights.pt"
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
    for path in ("models/weights.py", "models/sample_data.py", "handlers/handler_kit/vision.py",
                 *entry.model_files):
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
    cache = os.path.join(BUILD_DIR, "weights", entry.name, key)
    if force or not os.path.isfile(os.path.join(cache, WEIGHTS_FILE)):
        builder = BUILDERS[source["builder"]]
        log(f"{entry.name}: producing weights with {source['builder']} (one thread, deterministic)")
        started = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            args = {k: v for k, v in source.items() if k != "builder"}
            state, meta = builder(image=entry.handler_config["image"],
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


def stage(entry: ModelEntry, force_weights: bool) -> str:
    stage_dir = os.path.join(BUILD_DIR, "stage", entry.name)
    shutil.rmtree(stage_dir, ignore_errors=True)
    extra = os.path.join(stage_dir, "extra")
    os.makedirs(extra)
    meta = produce_weights(entry, stage_dir, force_weights)
    produce_labels(entry, extra)
    shutil.copytree(HANDLER_KIT, os.path.join(extra, "handler_kit"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for model_file in entry.model_files:
        shutil.copy(os.path.join(ROOT, model_file), extra)
    with open(os.path.join(stage_dir, "model-config.yaml"), "w", encoding="utf-8") as f:
        f.write("# Generated by scripts/build_archives.py from models/catalog.yaml; do not edit.\n")
        yaml.safe_dump(entry.model_config(WEIGHTS_FILE, LABELS_FILE, meta), f, sort_keys=False)
    return stage_dir


def archive(entry: ModelEntry, stage_dir: str, export_path: str) -> str:
    os.makedirs(export_path, exist_ok=True)
    command = [os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
               "--model-name", entry.name, "--version", entry.version,
               "--handler", os.path.join(ROOT, entry.handler),
               "--serialized-file", os.path.join(stage_dir, WEIGHTS_FILE),
               "--extra-files", os.path.join(stage_dir, "extra"),
               "--config-file", os.path.join(stage_dir, "model-config.yaml"),
               "--export-path", export_path, "--force"]
    subprocess.run(command, check=True, cwd=ROOT)
    mar = os.path.join(export_path, entry.mar_name)
    normalize_archive(mar)
    return mar


def update_sums(export_path: str, built: dict) -> None:
    sums_path = os.path.join(export_path, SUMS_FILE)
    sums = {}
    if os.path.isfile(sums_path):
        with open(sums_path) as f:
            for line in f:
                digest, _, name = line.strip().partition("  ")
                if name:
                    sums[name] = digest
    sums.update(built)
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
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    parser.add_argument("--force-weights", action="store_true", help="rebuild cached weights")
    parser.add_argument("--export-path", default=MODEL_STORE)
    args = parser.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "handlers")]
    catalog = load_catalog()
    entries = [catalog.model(n) for n in args.only] if args.only else catalog.models
    built = {}
    for i, entry in enumerate(entries, 1):
        started = time.perf_counter()
        log(f"({i}/{len(entries)}) {entry.name} {entry.version}")
        mar = archive(entry, stage(entry, args.force_weights), args.export_path)
        built[os.path.basename(mar)] = sha256_file(mar)
        log(f"{entry.name}: {os.path.relpath(mar, ROOT)} ({os.path.getsize(mar) / 1e6:.1f} MB, "
            f"sha256 {built[os.path.basename(mar)][:16]}) in {time.perf_counter() - started:.1f} s")
    update_sums(args.export_path, built)
    log(f"sample inputs in {os.path.relpath(write_samples(), ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
