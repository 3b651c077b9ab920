"""TorchServe handler for sentence embeddings (e.g. all-MiniLM-L6-v2); every model fact comes from
the archive's config.

Its stages over handler_kit.serving.StagedHandler (which owns loading order, warm-up, metrics,
profiling, out-of-memory splitting and per-request statuses), each a plain function in
handler_kit.text: text.texts_of (prepare, one request) -> text.tokenize_batch (all texts of the
batch at once) -> model once -> text.embed (mean pooling, L2 norm) (forward)
-> text.format_embeddings (answer, split back per request).
"""
import os

import torch

from handler_kit import batching, runtime, text
from handler_kit.quantization import check_dynamic_int8_worker, quantize_dynamic_int8
from handler_kit.serving import StagedHandler
from handler_kit.text_config import parse_text_embedder


class TextEmbedderHandler(StagedHandler):
    parse_config = staticmethod(parse_text_embedder)

    def load(self, model_dir, context):
        cfg = self.config
        check_dynamic_int8_worker(cfg.runtime.quantization, self.device)
        self.tokenizer, self.model = text.load_tokenizer_and_model(os.path.join(model_dir, cfg.model_path),
                                                                   self.device)
        text.check_max_length(cfg.max_length, self.tokenizer, self.model)
        if cfg.runtime.quantization == "dynamic_int8":
            self.model = quantize_dynamic_int8(self.model)
        self.model_name, self.version = context.model_name, batching.model_version(context)

    def warm_up_requests(self):
        """A full-size batch of texts longer than max_length: the truncation path, the widest
        padding."""
        long_text = ("warm up the encoder " * self.config.max_length)[:self.config.max_chars]
        return [{"body": long_text.encode()}] * self.max_batch

    def warm_up_answered(self, answer):
        return isinstance(answer, dict) and "embeddings" in answer

    def prepare(self, request):
        return text.texts_of(request, self.config.max_texts, self.config.max_chars)

    def forward(self, requests_texts):
        texts = [t for request_texts in requests_texts for t in request_texts]
        inputs, truncated = text.tokenize_batch(self.tokenizer, texts, self.config.max_length)
        with torch.inference_mode(), runtime.autocast(self.device, self.config.runtime.dtype):
            return text.embed(self.model, inputs, self.device), truncated

    def answer(self, requests_texts, outputs):
        embeddings, truncated = outputs
        counts = [len(request_texts) for request_texts in requests_texts]
        return text.format_embeddings(embeddings, truncated, counts, self.model_name, self.version)

    def describe(self):
        cfg = self.config
        return {"dtype": cfg.runtime.dtype, "quantization": cfg.runtime.quantization,
                "max_length": cfg.max_length, "dimension": int(self.model.config.hidden_size)}
