"""TorchServe handler for sentence embeddings (e.g. all-MiniLM-L6-v2); every model fact comes from
the archive's config.

Stages (each a plain function in handler_kit.text, unit-tested on its own):
text.texts_of -> text.tokenize_batch (all texts of the server-side batch at once) -> model once
-> text.embed (mean pooling, L2 norm) -> text.format_embeddings (split back per request).
A request that fails a stage gets its own 4xx; the rest of the server-side batch is answered.
"""
import logging
import os

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler_kit import batching, runtime, serving, text
from handler_kit.config import check_dynamic_int8_worker
from handler_kit.text_config import parse_text_embedder

logger = logging.getLogger(__name__)


class TextEmbedderHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        self.config = parse_text_embedder((context.model_yaml_config or {}).get("handler"))
        cfg = self.config
        self.device, _ = serving.place_worker(cfg.runtime, context)
        check_dynamic_int8_worker(cfg.runtime.quantization, self.device)
        folder = os.path.join(properties.get("model_dir"), cfg.model_path)
        self.tokenizer, self.model = text.load_tokenizer_and_model(folder, self.device)
        text.check_max_length(cfg.max_length, self.tokenizer, self.model)
        if cfg.runtime.quantization == "dynamic_int8":
            self.model = text.quantize_dynamic_int8(self.model)
        self.model_name = context.model_name
        self.version = str((context.manifest or {}).get("model", {}).get("modelVersion", ""))
        self.max_batch = int(properties.get("batch_size") or 1)
        serving.warm_up_then_serve(self, context, self._warm_up_requests(),
                                   lambda r: isinstance(r, dict) and "embeddings" in r)
        logger.info("model ready on %s (threads=%d, dtype=%s, quantization=%s, batch<=%d)", self.device,
                    torch.get_num_threads(), cfg.runtime.dtype, cfg.runtime.quantization, self.max_batch)

    def _warm_up_requests(self) -> list:
        """A full-size batch of texts longer than max_length: the truncation path, the widest
        padding."""
        long_text = ("warm up the encoder " * self.config.max_length)[:self.config.max_chars]
        return [{"body": long_text.encode()}] * self.max_batch

    def _prepare_one(self, request):
        return text.texts_of(request, self.config.max_texts, self.config.max_chars)

    def preprocess(self, data):
        return serving.prepare_batch(self, data, self._prepare_one)

    def inference(self, batch, *args, **kwargs):
        if not batch.items:
            return batch, None
        texts = [t for request_texts in batch.items for t in request_texts]
        with self.metrics.timed("Inference"):
            inputs, truncated = text.tokenize_batch(self.tokenizer, texts, self.config.max_length)
            with torch.inference_mode(), runtime.autocast(self.device, self.config.runtime.dtype), \
                    self.profiler.maybe_profile(len(batch.items)):
                embeddings = text.embed(self.model, inputs, self.device)
        return batch, (embeddings, truncated)

    def postprocess(self, data):
        batch, outputs = data
        results = []
        with self.metrics.timed("Postprocess"):
            if outputs is not None:
                embeddings, truncated = outputs
                counts = [len(request_texts) for request_texts in batch.items]
                results = text.format_embeddings(embeddings, truncated, counts, self.model_name, self.version)
            return batching.merge(batch, results, getattr(self, "context", None))

    def describe_handle(self):
        """Answer of the management API's describe call with ``?customized=true``."""
        runtime_cfg = self.config.runtime
        return {"meta": self.config.meta, "device": str(self.device), "dtype": runtime_cfg.dtype,
                "quantization": runtime_cfg.quantization, "max_length": self.config.max_length,
                "dimension": int(self.model.config.hidden_size)}
