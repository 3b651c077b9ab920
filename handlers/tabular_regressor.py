"""TorchServe handler for tabular regression (e.g. a SimpleModel trained on scikit-learn's diabetes
set); model facts come from the archive's config and its checkpoint (feature names, standardization,
version).

Stages (each a plain function in handler_kit.tabular, unit-tested on its own):
tabular.rows_of -> tabular.standardize (all rows of the server-side batch at once) -> model once
-> tabular.format_predictions (target units, split back per request).
A request that fails a stage gets its own 4xx; the rest of the server-side batch is answered.
"""
import logging
import os

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from handler_kit import batching, serving, tabular
from handler_kit.tabular_config import parse_tabular_regressor

logger = logging.getLogger(__name__)


class TabularRegressorHandler(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        self.config = parse_tabular_regressor((context.model_yaml_config or {}).get("handler"))
        cfg = self.config
        self.device, _ = serving.place_worker(cfg.runtime, context)
        self.regressor = tabular.load_regressor(os.path.join(properties.get("model_dir"), cfg.model.weights),
                                                cfg.model, self.device, cfg.runtime.quantization)
        self.max_batch = int(properties.get("batch_size") or 1)
        serving.warm_up_then_serve(self, context, self._warm_up_requests(), lambda r: (
            isinstance(r, dict) and "predictions" in r and np.isfinite(r["predictions"]).all()))
        logger.info("model ready: version %s on %s (threads=%d, quantization=%s, batch<=%d, rows<=%d)",
                    self.regressor.version, self.device, torch.get_num_threads(), cfg.runtime.quantization,
                    self.max_batch, cfg.max_rows)

    def _warm_up_requests(self) -> list:
        """A full-size batch of valid rows: the training means, as objects and as lists."""
        params = self.regressor.params
        names, mean = params.feature_names, [float(v) for v in params.mean]
        return [{"body": dict(zip(names, mean)) if i % 2 == 0 else [mean]} for i in range(self.max_batch)]

    def _prepare_one(self, request):
        return tabular.rows_of(request, self.regressor.params.feature_names, self.config.max_rows)

    def preprocess(self, data):
        return serving.prepare_batch(self, data, self._prepare_one)

    def inference(self, batch, *args, **kwargs):
        if not batch.items:
            return batch, None
        regressor = self.regressor
        with self.metrics.timed("Inference"):
            inputs = tabular.standardize(np.concatenate(batch.items), regressor.params)
            with self.profiler.maybe_profile(len(batch.items)):
                outputs = tabular.predict(regressor.model, inputs, regressor.device)
        return batch, outputs

    def postprocess(self, data):
        batch, outputs = data
        results = []
        with self.metrics.timed("Postprocess"):
            if outputs is not None:
                counts = [len(rows) for rows in batch.items]
                results = tabular.format_predictions(outputs, counts, self.regressor.params,
                                                     self.regressor.version)
            return batching.merge(batch, results, getattr(self, "context", None))

    def describe_handle(self):
        """Answer of the management API's describe call with ``?customized=true``."""
        return {"meta": self.config.meta, "device": str(self.device),
                "quantization": self.config.runtime.quantization,
                "feature_names": list(self.regressor.params.feature_names), "version": self.regressor.version,
                "max_rows": self.config.max_rows}
