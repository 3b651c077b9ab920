"""Optimized variants: each archive loads through TorchServe's model loader and agrees with fp32;
a variant that breaks the model is refused by the build; one that cannot run where it lands fails
at load."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from handler_kit import runtime
from handler_kit.image_config import parse_image_classifier
from handler_kit.errors import ConfigError
from models.catalog import CATALOG_PATH, ROOT, load_catalog
from tests.ts_harness import infer, load_service

CATALOG = load_catalog()
DIGITS_VARIANTS = [m.variant for m in CATALOG.models if m.base == "digits" and m.variant != "fp32"]
EFFICIENTNET_VARIANTS = [m.variant for m in CATALOG.models if m.base == "efficientnet_lite0" and m.variant != "fp32"]


def digits_requests(samples, count=16):
    _, _, images, labels = samples.digits_split()
    return [("body", "image/png", samples.png_bytes(p)) for p in images[:count]], labels[:count]


@pytest.fixture(scope="module")
def digits_fp32_top1(extracted_archives, samples):
    requests, _ = digits_requests(samples)
    service = load_service(extracted_archives["digits"], batch_size=8)
    return [out[0]["index"] for _, out in infer(service, requests)]


@pytest.mark.parametrize("variant", DIGITS_VARIANTS)
def test_digits_variant_serves_and_agrees_with_fp32(variant, extracted_archives, samples, digits_fp32_top1):
    service = load_service(extracted_archives[f"digits_{variant}"], batch_size=8)
    requests, labels = digits_requests(samples)
    results = infer(service, requests)
    assert all(status == 200 for status, _ in results)
    # The build gate allows a variant to lose up to 0.5 accuracy points (~2 of 360 held-out
    # digits), and bf16/int8 kernels differ by CPU capability: at most one of 16 may flip.
    top1 = [out[0]["index"] for _, out in results]
    assert sum(a != b for a, b in zip(top1, digits_fp32_top1)) <= 1, (top1, digits_fp32_top1)
    described = service._entry_point.__self__.describe_handle()
    assert described["meta"]["variant"] == variant
    assert described["meta"]["fidelity"]["accuracy_drop_points"] <= 0.5


@pytest.mark.parametrize("variant", EFFICIENTNET_VARIANTS)
def test_efficientnet_lite0_variant_serves_photos(variant, extracted_archives, samples):
    service = load_service(extracted_archives[f"efficientnet_lite0_{variant}"], batch_size=8)
    results = infer(service, [("body", "image/jpeg", photo) for photo in samples.photo_bytes()])
    assert [status for status, _ in results] == [200, 200]
    assert all(len(out) == 5 for _, out in results)
    meta = service._entry_point.__self__.describe_handle()["meta"]
    assert meta["fidelity"]["samples"] >= 64 and meta["fidelity"]["mean_cosine"] >= 0.99


def test_int8_on_a_gpu_fails_at_load_with_a_reason(extracted_archives):
    folder = extracted_archives["digits_int8"]
    with open(os.path.join(folder, "model-config.yaml")) as f:
        cfg = parse_image_classifier(yaml.safe_load(f)["handler"])
    # The check runs before anything touches CUDA, so it is exercised on CPU-only machines too.
    with pytest.raises(ConfigError, match="int8_x86 quantized model, which runs on CPU only"):
        runtime.load_runner(cfg.model, cfg.runtime, folder, torch.device("cuda:0"), 1)
    section = yaml.safe_load(open(os.path.join(folder, "model-config.yaml")))["handler"]
    section["runtime"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="runs on CPU only"):
        parse_image_classifier(section)


def test_onnx_without_onnxruntime_fails_loudly(extracted_archives, monkeypatch):
    folder = extracted_archives["digits_onnx"]
    with open(os.path.join(folder, "model-config.yaml")) as f:
        cfg = parse_image_classifier(yaml.safe_load(f)["handler"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="needs the onnxruntime package"):
        runtime.load_runner(cfg.model, cfg.runtime, folder, torch.device("cpu"), 1)


def test_build_refuses_quantization_without_calibration(tmp_path):
    with open(CATALOG_PATH) as f:
        catalog = yaml.safe_load(f)
    digits = next(m for m in catalog["models"] if m["name"] == "digits")
    digits["variants"] = [{"variant": "int8", "transform": {"kind": "int8_x86", "calibration": "none"}}]
    catalog["models"] = [digits]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    result = subprocess.run([sys.executable, "-m", "scripts.build.build_archives", "--catalog", str(path),
                             "--only", "digits_int8", "--export-path", str(tmp_path / "store")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "REFUSED digits_int8: held-out accuracy" in result.stdout
    assert not (tmp_path / "store" / "digits_int8.mar").exists()
