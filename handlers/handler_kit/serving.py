"""The staged base handler: what every handler of this project does the same way around its own
stages.

A family's handler (handlers/<family>.py) subclasses ``StagedHandler`` and writes only its stages:

    parse_config(section)      its schema: the archive's ``handler:`` section -> a config object
                               with ``runtime`` (device, threads) and ``meta``
    load(model_dir, context)   its model, onto ``self.device`` (``self.threads`` intra-op threads)
    warm_up_requests()         a full-size batch of valid requests (``self.max_batch`` of them)
    warm_up_answered(answer)   whether a warm-up answer is a real one
    prepare(request)           one request -> its model input; a RequestError fails it alone
    forward(items)             the prepared inputs of some requests -> their outputs, whose rows
                               join across consecutive chunks (a tensor, a list, or a tuple of those)
    answer(items, outputs)     one response body per request
    describe()                 what the management API's describe adds to meta and device

The base owns the rest, identical for every family: configuration entry, device and thread
placement (``place_worker``), readiness only after a full-size warm-up batch went through every
stage, stage timing and batch metrics, the profiler switch, CUDA out-of-memory splitting (a batch
that runs out is retried in halves; a request that does not fit alone gets its own 503), and
per-request status merging (a bad request gets its own 4xx inside a batch; the rest are answered).

TorchServe requires a handler file to define exactly one class; an imported base class is fine.
"""
import logging
import time

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler_kit import batching, oom, runtime
from handler_kit.metrics import HandlerMetrics, NoMetrics
from handler_kit.profiling import Profiler

logger = logging.getLogger(__name__)


def place_worker(runtime_spec, context) -> tuple:
    """(device, intra-op threads): the GPU TorchServe assigned (or CPU), and on CPU the cores
    divided among the model's workers. The one place a worker's threads are decided."""
    properties = context.system_properties
    device = runtime.select_device(runtime_spec.device, properties.get("gpu_id"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        workers = (context.model_yaml_config or {}).get("maxWorkers", 1)
        threads = runtime.thread_budget(runtime_spec.threads, workers, runtime.available_cores())
        runtime.apply_thread_budget(threads)
    return device, threads


class StagedHandler(BaseHandler):
    """TorchServe's handler protocol (initialize, preprocess, inference, postprocess,
    describe_handle) over a family's stages; see the module's docstring."""

    # -- a family's stages ----------------------------------------------------------------------
    @staticmethod
    def parse_config(handler_section):
        raise NotImplementedError

    def load(self, model_dir: str, context) -> None:
        raise NotImplementedError

    def warm_up_requests(self) -> list:
        raise NotImplementedError

    def warm_up_answered(self, answer) -> bool:
        raise NotImplementedError

    def prepare(self, request):
        raise NotImplementedError

    def forward(self, items: list):
        raise NotImplementedError

    def answer(self, items: list, outputs) -> list:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}

    # -- TorchServe's protocol ------------------------------------------------------------------
    def initialize(self, context):
        properties = context.system_properties
        self.config = self.parse_config((context.model_yaml_config or {}).get("handler"))
        self.device, self.threads = place_worker(self.config.runtime, context)
        self.max_batch = int(properties.get("batch_size") or 1)
        self.load(properties.get("model_dir"), context)
        self.warm_up(context)
        logger.info("model ready on %s (threads=%d, batch<=%d): %s", self.device, torch.get_num_threads(),
                    self.max_batch, self.describe())

    def warm_up(self, context) -> None:
        """Run a full-size batch through every stage, without metrics or profiling; the worker is
        ready only if every request of it is answered. Then switch metrics and the profiler on."""
        self.metrics = NoMetrics()
        self.profiler = Profiler(None, context.model_name)  # the warm-up batch is never profiled
        requests = self.warm_up_requests()
        started = time.perf_counter()
        results = self.postprocess(self.inference(self.preprocess(requests)))
        failed = [r for r in results if not self.warm_up_answered(r)]
        if failed:
            raise RuntimeError(f"warm-up inference failed: {failed[0]}")
        logger.info("warm-up batch of %d took %.0f ms", len(requests), (time.perf_counter() - started) * 1000)
        self.metrics = HandlerMetrics(context.metrics, context.model_name,
                                      str(self.config.meta.get("version", "")))
        self.profiler = Profiler.from_environment(context.model_name)
        self.initialized = True

    def preprocess(self, data):
        """``prepare`` on every request of a server-side batch, timed and counted (rejects by
        reason); a request that fails keeps its error, the others go on."""
        with self.metrics.timed("Preprocess"):
            batch = batching.prepare(data, self.prepare)
        self.metrics.batch(batch.size, batch.errors)
        return batch

    def inference(self, batch, *args, **kwargs):
        """``forward`` once over the good requests; on CUDA out of memory, cached memory is freed
        and the requests are retried in halves, and one that does not fit alone fails with 503."""
        if not batch.items:
            return batch, None
        with self.metrics.timed("Inference"), self.profiler.maybe_profile(len(batch.items)):
            run = oom.run_with_oom_split(self.forward, batch.items)
        oom.move_failures_to_errors(batch, run.errors)
        return batch, run.outputs

    def postprocess(self, data):
        """One response per request, in request order: answers, and each failed request's status
        and JSON error (batching.merge)."""
        batch, outputs = data
        with self.metrics.timed("Postprocess"):
            results = [] if outputs is None else self.answer(batch.items, outputs)
            return batching.merge(batch, results, getattr(self, "context", None))

    def describe_handle(self):
        """Answer of the management API's describe call with ``?customized=true``."""
        return {"meta": self.config.meta, "device": str(self.device), **self.describe()}

