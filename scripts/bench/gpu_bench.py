"""The image model on a GPU, in-process, side by side in one run (part of the prepared GPU check,
scripts/gpu_check.sh; runs on CPU too, for a smoke test):

    python -m scripts.bench.gpu_bench [--model efficientnet_lite0] [--batches 64,256] [--seconds 5]
                                [--device cuda] [--out DIR]

Rows, each on the same JPEG photos (china.jpg and flower.jpg in turn), img/s end to end
(JPEG bytes in, top-k out):
  handler fp32        the archive's handler as a worker runs it: CPU decoding, fp32 on the device;
  handler fp16 cl     the same handler with runtime dtype float16 (autocast) and channels_last;
  device decode fp16  the whole batch decoded on the device (torchvision.io.decode_jpeg with
                      device=cuda, one call per batch), resized, cropped and normalized there,
                      then the fp16 channels_last model: the handler path a GPU profile would use.
Each row also gives its top-1 agreement with the fp32 handler on the photos.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch
import yaml

from models.catalog import MODEL_STORE, load_catalog
from models.families import FOUNDATION_MODEL
from models.sample_data import photo_bytes
from scripts.bench.in_process_rows import InProcessPipeline, extract_archive
from scripts.bench.report import machine_description
from scripts.build.in_process import importable


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", flush=True)


def with_runtime(archive_dir: str, workdir: str, name: str, **runtime) -> str:
    """A copy of the extracted archive whose handler runtime section has ``runtime`` set."""
    folder = os.path.join(workdir, name)
    shutil.copytree(archive_dir, folder)
    path = os.path.join(folder, "model-config.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    config["handler"].setdefault("runtime", {}).update(runtime)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return folder


def timed(run, batch: list, seconds: float, sync) -> Dict[str, float]:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, lazy module init
        run(batch)
    sync()
    times = []
    started = time.perf_counter()
    while not times or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        run(batch)
        sync()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {"img_s": round(len(times) * len(batch) / elapsed, 1),
            "batch_p50_ms": round(1000 * statistics.median(times), 2), "batches": len(times)}


class DeviceDecodePipeline:
    """JPEG bytes -> top-1 indices with every pixel operation on ``device``."""

    def __init__(self, handler, device: torch.device):
        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import functional as F
        self.decode_jpeg, self.F = decode_jpeg, F
        self.handler, self.device = handler, device
        image = handler.config.image
        self.resize, self.crop = image.resize, image.crop
        self.mean = torch.tensor(image.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(image.std, device=device).view(1, -1, 1, 1)
        self.model = handler.run_model.model.to(device=device, memory_format=torch.channels_last).half()

    def __call__(self, bodies: List[bytes]) -> List[int]:
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bodies]
        images = self.decode_jpeg(raw, device=self.device)  # one batched call (nvJPEG on CUDA)
        crops = [self.F.center_crop(self.F.resize(im, [self.resize], antialias=True), [self.crop] * 2)
                 for im in images]
        batch = torch.stack(crops).half().div_(255).sub_(self.mean.half()).div_(self.std.half())
        with torch.inference_mode():
            logits = self.model(batch.contiguous(memory_format=torch.channels_last))
        return logits.argmax(dim=1).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=FOUNDATION_MODEL)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join("build", "bench"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    entry = load_catalog().archive(args.model)
    photos = photo_bytes()
    rows, agreement = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as workdir:
        base = extract_archive(os.path.join(MODEL_STORE, entry.mar_name), os.path.join(workdir, "fp32"))
        variants = {"handler fp32": base,
                    "handler fp16 cl": with_runtime(base, workdir, "fp16", dtype="float16", channels_last=True)}
        reference = None
        for size in (int(b) for b in args.batches.split(",")):
            batch = [photos[i % len(photos)] for i in range(size)]
            for label, folder in variants.items():
                with importable(folder):
                    pipeline = InProcessPipeline(folder, {"batchSize": size})
                top1 = [a[0]["index"] if isinstance(a, list) else a for a in pipeline(photos)]
                reference = reference or top1
                agreement[label] = sum(a == b for a, b in zip(top1, reference)) / len(reference)
                rows.append({"row": label, "batch": size, **timed(pipeline, batch, args.seconds, sync)})
                log(f"{label} batch {size}: {rows[-1]}")
                if label == "handler fp32":
                    fp32_handler = pipeline.handler
            device_decode = DeviceDecodePipeline(fp32_handler, device)
            agreement["device decode fp16"] = (sum(a == b for a, b in zip(device_decode(photos), reference))
                                               / len(reference))
            rows.append({"row": "device decode fp16", "batch": size,
                         **timed(device_decode, batch, args.seconds, sync)})
            log(f"device decode fp16 batch {size}: {rows[-1]}")
    result = {"machine": machine_description(), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "rows": rows, "top1_agreement_with_fp32": agreement}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
