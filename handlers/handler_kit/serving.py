"""What every handler of this project does the same way around its own stages: place the worker
(device, thread budget), become ready only after a full-size warm-up batch went through every
stage, and prepare each server-side batch with its metrics. Plain functions taking the handler,
so that a handler file keeps exactly one class (a TorchServe rule)."""
import logging
import time
from typing import Callable

import torch

from handler_kit import batching, runtime
from handler_kit.metrics import HandlerMetrics, NoMetrics
from handler_kit.profiling import Profiler

logger = logging.getLogger(__name__)


def place_worker(runtime_spec, context) -> tuple:
    """(device, intra-op threads): the GPU TorchServe assigned (or CPU), and on CPU the cores
    divided among the model's workers."""
    properties = context.system_properties
    device = runtime.select_device(runtime_spec.device, properties.get("gpu_id"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        workers = (context.model_yaml_config or {}).get("maxWorkers", 1)
        threads = runtime.thread_budget(runtime_spec.threads, workers, runtime.available_cores())
        runtime.apply_thread_budget(threads)
    return device, threads


def warm_up_then_serve(handler, context, requests: list, answered: Callable[[object], bool]) -> None:
    """Run ``requests`` (a full batch) through the handler's stages, without metrics or profiling;
    the worker is ready only if every one of them is ``answered``. Then switch metrics and the
    profiler switch on."""
    handler.metrics = NoMetrics()
    handler.profiler = Profiler(None, context.model_name)  # the warm-up batch is never profiled
    started = time.perf_counter()
    results = handler.postprocess(handler.inference(handler.preprocess(requests)))
    failed = [r for r in results if not answered(r)]
    if failed:
        raise RuntimeError(f"warm-up inference failed: {failed[0]}")
    logger.info("warm-up batch of %d took %.0f ms", len(requests), (time.perf_counter() - started) * 1000)
    handler.metrics = HandlerMetrics(context.metrics, context.model_name,
                                     str(handler.config.meta.get("version", "")))
    handler.profiler = Profiler.from_environment(context.model_name)
    handler.initialized = True


def prepare_batch(handler, requests, stage: Callable) -> batching.Batch:
    """``stage`` on every request of a server-side batch, timed and counted (rejects by reason)."""
    with handler.metrics.timed("Preprocess"):
        batch = batching.prepare(requests, stage)
    handler.metrics.batch(batch.size, batch.errors)
    return batch
