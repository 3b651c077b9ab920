"""TorchServe handler for image classification; every model fact comes from the archive's config.

Its stages over handler_kit.serving.StagedHandler (which owns loading order, warm-up, metrics,
profiling, out-of-memory splitting and per-request statuses), each a plain function in handler_kit:
wire.binary_payload -> vision.decode -> vision.resize_and_crop (prepare, one request)
-> vision.to_batch -> model (forward) -> classification.format_topk (answer: project or stock shape).
"""
import io
import os

from PIL import Image

from handler_kit import runtime, vision, wire
from handler_kit.classification import format_topk, load_labels
from handler_kit.image_config import parse_image_classifier
from handler_kit.serving import StagedHandler


class ImageClassifierHandler(StagedHandler):
    parse_config = staticmethod(parse_image_classifier)

    def load(self, model_dir, context):
        cfg = self.config
        self.channels_last = cfg.runtime.channels_last and cfg.model.format != "onnx"
        self.run_model = runtime.load_runner(cfg.model, cfg.runtime, model_dir, self.device, self.threads)
        self.labels = load_labels(os.path.join(model_dir, cfg.labels), cfg.model.kwargs.get("num_classes"))

    def warm_up_requests(self):
        """A full-size batch of one synthetic PNG: every stage, decoding included."""
        buffer = io.BytesIO()
        Image.linear_gradient("L").convert("RGB").resize((320, 240)).save(buffer, format="PNG")
        return [{"body": buffer.getvalue()}] * self.max_batch

    def warm_up_answered(self, answer):
        return isinstance(answer, list if self.config.answer == "project" else dict) and bool(answer)

    def prepare(self, request):
        image_cfg = self.config.image
        # a JPEG twice as large as needed is decoded reduced (libjpeg DCT scaling), never below
        # twice the resize target
        min_short_side = 2 * image_cfg.resize if image_cfg.jpeg_dct_scaling else 0
        image = vision.decode(wire.binary_payload(request), image_cfg.color, image_cfg.max_pixels,
                              min_short_side)
        return vision.resize_and_crop(image, image_cfg.resize, image_cfg.crop)

    def forward(self, images):
        image_cfg = self.config.image
        return self.run_model(vision.to_batch(images, image_cfg.mean, image_cfg.std, self.channels_last))

    def answer(self, images, logits):
        return format_topk(logits, self.labels, self.config.topk, self.config.answer)

    def describe(self):
        cfg = self.config
        return {"dtype": cfg.runtime.dtype, "format": cfg.model.format, "quantization": cfg.model.quantization}
