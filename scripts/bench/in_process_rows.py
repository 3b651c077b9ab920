"""In-process rows: an archive's handler stages run in this process, in the catalog's batches."""
import gc
import os
import shutil
import time
import zipfile
from typing import Dict, Optional, Sequence

import torch
import yaml

from models.catalog import MODEL_STORE, ModelEntry
from scripts.bench.measure import (CONTENT_TYPES, IN_PROCESS, ITEM_UNITS, ForeignCpu, Measurement, answer_summary,
                                   archive_stem, log, worker_value)
from scripts.build.in_process import importable, load_service


def extract_archive(mar_path: str, out_dir: str, names: Optional[Sequence[str]] = None) -> str:
    """``names`` from the archive (all of it when None) into out_dir."""
    with zipfile.ZipFile(mar_path) as archive:
        archive.extractall(out_dir, members=names)
    return out_dir


def read_model_config(mar_path: str) -> dict:
    """The archive's model-config.yaml: what the worker is configured with, fidelity included."""
    with zipfile.ZipFile(mar_path) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))


# -- in-process rows -----------------------------------------------------------------------------
class InProcessPipeline:
    """The archive's own handler, loaded by TorchServe's model loader and called stage by stage
    (preprocess, inference, postprocess) on request bodies decoded as the worker decodes them: what
    the worker runs, without HTTP, the frontend's batching or the worker's socket."""

    def __init__(self, archive_dir: str, model_config: dict):
        with importable(archive_dir):
            # A worker gets a GPU from TorchServe whenever one exists; mirror that.
            service = load_service(archive_dir, batch_size=model_config.get("batchSize", 1),
                                   gpu_id=0 if torch.cuda.is_available() else None)
        self.handler = service._entry_point.__self__
        self.device = self.handler.device
        self.threads = torch.get_num_threads()  # the handler applied its thread budget

    def settings(self) -> dict:
        """How the handler runs the model, as it reports itself to the management API (without
        its meta, which is the build's), plus the thread count and, for images, the memory layout."""
        described = {k: v for k, v in self.handler.describe_handle().items() if k != "meta"}
        layout = getattr(self.handler, "channels_last", None)
        return {"threads": self.threads, "device": str(self.device), **described,
                **({} if layout is None else {"channels_last": layout})}

    def __call__(self, values: Sequence) -> list:
        handler = self.handler
        answers = handler.postprocess(handler.inference(handler.preprocess([{"body": v} for v in values])))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return answers


def measure_in_process(key: str, entry: ModelEntry, bodies: Dict[str, bytes], warmup_s: float,
                       seconds: float, workdir: str) -> Measurement:
    mar_path = os.path.join(MODEL_STORE, entry.mar_name)
    archive_dir = extract_archive(mar_path, os.path.join(workdir, IN_PROCESS, archive_stem(entry)))
    pipeline = InProcessPipeline(archive_dir, read_model_config(mar_path))
    batch_size = entry.serving["batchSize"]
    content_type = CONTENT_TYPES[entry.family]
    values = {name: worker_value(body, content_type) for name, body in bodies.items()}
    samples = list(values.values())
    batch = [samples[i % len(samples)] for i in range(batch_size)]
    unit = ITEM_UNITS[entry.family]
    result = Measurement(key, latency_unit=f"batch of {batch_size}", unit=unit,
                         settings={"archive": entry.mar_name, "batch_size": batch_size, **pipeline.settings()})
    result.answers = {name: answer_summary(pipeline([value])[0]) for name, value in values.items()}
    log(f"({key}) batch {batch_size}, {pipeline.threads} thread(s) on {pipeline.device}: "
        f"warming up {warmup_s:g} s, then measuring {seconds:g} s")
    run_batches(pipeline, batch, warmup_s)
    foreign = ForeignCpu()
    foreign.start()
    # Duration-bounded, not a fixed count: a slow variant (bf16 autocast without native bf16
    # instructions runs at a few img/s) takes as long as a fast one.
    result.latencies_ms, result.seconds = run_batches(pipeline, batch, seconds)
    result.foreign_cpu_cores = foreign.cores()
    result.items = len(result.latencies_ms) * batch_size
    del pipeline
    gc.collect()  # give the model's memory back before the next row
    shutil.rmtree(archive_dir, ignore_errors=True)
    log(f"({key}) {result.throughput:.1f} {unit}/s (other programs used "
        f"{result.foreign_cpu_cores:.2f} cores meanwhile)")
    return result


def run_batches(pipeline: InProcessPipeline, batch: list, seconds: float):
    """Back-to-back batches for ``seconds`` (at least one): per-batch ms and the elapsed time."""
    latencies = []
    started = time.perf_counter()
    while not latencies or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        pipeline(batch)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies, time.perf_counter() - started
