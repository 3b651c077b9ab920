"""Bring your own model (docs/own-model.md), exactly as a user does it: an architecture that is not
in torchvision (a file of theirs), a plain state_dict, a labels file and their preprocessing,
declared by one catalog entry. The build packages it, gates its variants for fidelity, the
archive answers photographs, and the benchmark's stock-handler archive serves the same network."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import yaml

from scripts.bench import served
from models.catalog import CATALOG_PATH, ROOT, load_catalog
from scripts.build.in_process import new_worker_imports
from tests.ts_harness import infer, load_service

ARCHITECTURE = textwrap.dedent('''
    """A user's own small classifier (not in torchvision)."""
    import torch
    from torch import nn


    class PebbleNet(nn.Module):
        def __init__(self, num_classes: int = 3, width: int = 8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU6(),
                nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU6(),
                nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))


    def pebble_net(**kwargs):
        return PebbleNet(**kwargs)
''')
LABELS = ["pebble", "boulder", "sand", "gravel", "shingle", "cobble"]  # the stock handler answers a top 5


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """(catalog path, model store) after `build_archives` built the user's entry and variants."""
    folder = tmp_path_factory.mktemp("own-model")
    (folder / "pebble.py").write_text(ARCHITECTURE)
    spec = importlib.util.spec_from_file_location("pebble", folder / "pebble.py")
    pebble = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pebble)
    torch.manual_seed(0)
    net = pebble.pebble_net(num_classes=len(LABELS)).eval()
    torch.save(net.state_dict(), folder / "pebble.pt")
    (folder / "labels.json").write_text(json.dumps(LABELS))
    with open(CATALOG_PATH, encoding="utf-8") as f:
        catalog = yaml.safe_load(f)
    catalog["models"] = [{
        "name": "pebble", "family": "image", "version": "0.1",
        "description": "a user's own architecture and weights",
        "handler": "handlers/image_classifier.py",
        "model_files": [str(folder / "pebble.py")],
        "weights": {"file": str(folder / "pebble.pt")},
        "labels": {"file": str(folder / "labels.json")},
        "serving": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 30},
        "handler_config": {
            "model": {"module": "pebble", "factory": "pebble_net", "kwargs": {"num_classes": len(LABELS)}},
            "image": {"resize": 72, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "topk": 2, "runtime": {"threads": 1}},
        "fidelity": {"metric": "agreement", "images": 64},
        "variants": [{"variant": "torchscript", "transform": {"kind": "torchscript"}},
                     {"variant": "onnx", "transform": {"kind": "onnx"}, "runtime": {"channels_last": False}}],
    }]
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    store = folder / "store"
    result = subprocess.run([sys.executable, "-m", "scripts.build.build_archives", "--catalog", str(path),
                             "--export-path", str(store)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(path), str(store)


def extract(mar: str, folder) -> str:
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(folder)
    return str(folder)


def test_own_model_and_its_variants_are_built_gated_and_answer(own_model, samples, tmp_path):
    _, store = own_model
    assert sorted(n for n in os.listdir(store) if n.endswith(".mar")) == [
        "pebble.mar", "pebble_onnx.mar", "pebble_torchscript.mar"]
    photos = [("body", "image/jpeg", photo) for photo in samples.photo_bytes()]
    answers = {}
    for stem in ("pebble", "pebble_torchscript", "pebble_onnx"):
        folder = extract(os.path.join(store, f"{stem}.mar"), tmp_path / stem)
        config = yaml.safe_load(open(os.path.join(folder, "model-config.yaml")))["handler"]
        if stem != "pebble":  # the gate measured the variant against the user's fp32 model
            fidelity = config["meta"]["fidelity"]
            assert fidelity["samples"] == 64 and fidelity["top1_agreement"] >= 0.98
            assert fidelity["mean_cosine"] >= 0.99
        results = infer(load_service(folder, batch_size=2), photos)
        assert [status for status, _ in results] == [200, 200]
        assert all(len(top) == 2 and top[0]["label"] in LABELS for _, top in results)
        answers[stem] = [top[0]["label"] for _, top in results]
    assert answers["pebble_torchscript"] == answers["pebble"] == answers["pebble_onnx"]


def test_stock_handler_archive_serves_the_same_network(own_model, samples, tmp_path, monkeypatch):
    catalog_path, store = own_model
    catalog = load_catalog(catalog_path)
    monkeypatch.setattr(served, "MODEL_STORE", store)  # where the stock archive takes its state_dict from
    stock_mar = served.build_stock_archive(catalog.model("pebble"), catalog, str(tmp_path / "stock-store"),
                                          str(tmp_path / "work"))
    # As in a TorchServe worker, "image_classifier" must resolve to TorchServe's stock handler, not
    # to this project's handler file that the archives extracted by the test above hold.
    with new_worker_imports():
        service = load_service(extract(stock_mar, tmp_path / "stock"), batch_size=1)
        assert type(service._entry_point.__self__).__module__.startswith("ts.torch_handler")
        (status, answer), = infer(service, [("body", "image/jpeg", samples.photo_bytes()[0])])
    assert status == 200
    # TorchServe's stock image_classifier: {label: probability} (its own ImageNet normalization,
    # so only the shape and the labels are compared, not the figures)
    stock = answer if isinstance(answer, dict) else json.loads(answer)
    assert len(stock) == 5 and set(stock) <= set(LABELS) and 0 < sum(stock.values()) <= 1 + 1e-6
