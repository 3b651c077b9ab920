"""TorchServe handler for image classification; every model fact comes from the archive's config.

Stages (each a plain function in handler_kit, unit-tested on its own):
wire.binary_payload -> vision.decode -> vision.resize_and_crop -> vision.to_batch -> model
-> outputs.topk_predictions. A request that fails a stage gets its own 4xx; the rest of the
server-side batch is answered.
"""
import io
import logging
import os
import time

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from handler_kit import batching, oom, runtime, vision, wire
from handler_kit.config import parse_image_classifier
from handler_kit.metrics import HandlerMetrics, NoMetrics
from handler_kit.profiling import Profiler
from handler_kit.outputs import load_labels, topk_predictions

logger = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        model_config = context.model_yaml_config or {}
        self.config = parse_image_classifier(model_config.get("handler"))
        cfg = self.config
        self.device = runtime.select_device(cfg.runtime.device, properties.get("gpu_id"))
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            threads = runtime.thread_budget(cfg.runtime.threads, model_config.get("maxWorkers", 1),
                                            runtime.available_cores())
            runtime.apply_thread_budget(threads)
        self.channels_last = cfg.runtime.channels_last and cfg.model.format != "onnx"
        self.run_model = runtime.load_runner(cfg.model, cfg.runtime, model_dir, self.device, threads)
        self.labels = load_labels(os.path.join(model_dir, cfg.labels),
                                  cfg.model.kwargs.get("num_classes"))
        self.max_batch = int(properties.get("batch_size") or 1)
        self.metrics = NoMetrics()
        self.profiler = Profiler(None, context.model_name)  # the warm-up batch is never profiled
        self._warm_up()
        self.metrics = HandlerMetrics(context.metrics, context.model_name, self.config.meta.get("version", ""))
        self.profiler = Profiler.from_environment(context.model_name)
        self.initialized = True
        logger.info("model ready: %s %s on %s (threads=%d, dtype=%s, batch<=%d)", cfg.model.format,
                    cfg.model.quantization, self.device, torch.get_num_threads(), cfg.runtime.dtype,
                    self.max_batch)

    def _warm_up(self):
        """A worker is ready only once a full-size batch has gone through every stage."""
        image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        requests = [{"body": buffer.getvalue()}] * self.max_batch
        started = time.perf_counter()
        results = self.postprocess(self.inference(self.preprocess(requests)))
        bad = [r for r in results if not isinstance(r, list)]
        if bad:
            raise RuntimeError(f"warm-up inference failed: {bad[0]}")
        logger.info("warm-up batch of %d took %.0f ms", self.max_batch,
                    (time.perf_counter() - started) * 1000)

    def _prepare_one(self, request) -> torch.Tensor:
        image_cfg = self.config.image
        image = vision.decode(wire.binary_payload(request), image_cfg.color, image_cfg.max_pixels)
        return vision.resize_and_crop(image, image_cfg.resize, image_cfg.crop)

    def preprocess(self, data):
        with self.metrics.timed("Preprocess"):
            batch = batching.prepare(data, self._prepare_one)
        self.metrics.batch(batch.size, batch.errors)
        return batch

    def inference(self, batch, *args, **kwargs):
        if not batch.items:
            return batch, None
        image_cfg = self.config.image
        with self.metrics.timed("Inference"):
            inputs = vision.to_batch(batch.items, image_cfg.mean, image_cfg.std, self.channels_last)
            with self.profiler.maybe_profile(len(batch.items)):
                # CUDA out of memory: cached memory freed, the batch retried in halves
                run = oom.run_with_oom_split(self.run_model, inputs)
            oom.move_failures_to_errors(batch, run.errors)
            return batch, run.outputs

    def postprocess(self, data):
        batch, logits = data
        with self.metrics.timed("Postprocess"):
            results = [] if logits is None else topk_predictions(logits, self.labels, self.config.topk)
            return batching.merge(batch, results, getattr(self, "context", None))

    def describe_handle(self):
        """Answer of the management API's describe call with ``?customized=true``."""
        return {"meta": self.config.meta, "device": str(self.device), "dtype": self.config.runtime.dtype,
                "format": self.config.model.format, "quantization": self.config.model.quantization}
