"""TorchServe handler for image classification; every model fact comes from the archive's config.

Stages (each a plain function in handler_kit, unit-tested on its own):
wire.binary_payload -> vision.decode -> vision.resize_and_crop -> vision.to_batch -> model
-> outputs.format_topk (handler.answer: project or stock shape). A request that fails a stage gets its own 4xx; the rest of the
server-side batch is answered.
"""
import io
import logging
import os

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from handler_kit import batching, oom, runtime, serving, vision, wire
from handler_kit.config import parse_image_classifier
from handler_kit.outputs import format_topk, load_labels

logger = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        self.config = parse_image_classifier((context.model_yaml_config or {}).get("handler"))
        cfg = self.config
        self.device, threads = serving.place_worker(cfg.runtime, context)
        self.channels_last = cfg.runtime.channels_last and cfg.model.format != "onnx"
        self.run_model = runtime.load_runner(cfg.model, cfg.runtime, model_dir, self.device, threads)
        self.labels = load_labels(os.path.join(model_dir, cfg.labels),
                                  cfg.model.kwargs.get("num_classes"))
        self.max_batch = int(properties.get("batch_size") or 1)
        serving.warm_up_then_serve(self, context, self._warm_up_requests(),
                                   lambda r: isinstance(r, (list if cfg.answer == "project" else dict)) and bool(r))
        logger.info("model ready: %s %s on %s (threads=%d, dtype=%s, batch<=%d)", cfg.model.format,
                    cfg.model.quantization, self.device, torch.get_num_threads(), cfg.runtime.dtype,
                    self.max_batch)

    def _warm_up_requests(self) -> list:
        """A full-size batch of one synthetic PNG: every stage, decoding included."""
        image = Image.linear_gradient("L").convert("RGB").resize((320, 240))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return [{"body": buffer.getvalue()}] * self.max_batch

    def _prepare_one(self, request) -> torch.Tensor:
        image_cfg = self.config.image
        # a JPEG twice as large as needed is decoded reduced (libjpeg DCT scaling), never below
        # twice the resize target
        min_short_side = 2 * image_cfg.resize if image_cfg.jpeg_dct_scaling else 0
        image = vision.decode(wire.binary_payload(request), image_cfg.color, image_cfg.max_pixels,
                              min_short_side)
        return vision.resize_and_crop(image, image_cfg.resize, image_cfg.crop)

    def preprocess(self, data):
        return serving.prepare_batch(self, data, self._prepare_one)

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
            results = [] if logits is None else format_topk(logits, self.labels, self.config.topk,
                                                            self.config.answer)
            return batching.merge(batch, results, getattr(self, "context", None))

    def describe_handle(self):
        """Answer of the management API's describe call with ``?customized=true``."""
        return {"meta": self.config.meta, "device": str(self.device), "dtype": self.config.runtime.dtype,
                "format": self.config.model.format, "quantization": self.config.model.quantization}
