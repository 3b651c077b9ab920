"""TorchServe handler for tabular regression (e.g. a SimpleModel trained on scikit-learn's diabetes
set); model facts come from the archive's config and its checkpoint (feature names, standardization,
version).

Its stages over handler_kit.serving.StagedHandler (which owns loading order, warm-up, metrics,
profiling, out-of-memory splitting and per-request statuses), each a plain function in
handler_kit.tabular: tabular.rows_of (prepare, one request) -> tabular.standardize (all rows of the
batch at once) -> model once (forward) -> tabular.format_predictions (answer: target units, split
back per request).
"""
import os

import numpy as np

from handler_kit import tabular
from handler_kit.serving import StagedHandler
from handler_kit.tabular_config import parse_tabular_regressor


class TabularRegressorHandler(StagedHandler):
    parse_config = staticmethod(parse_tabular_regressor)

    def load(self, model_dir, context):
        cfg = self.config
        self.regressor = tabular.load_regressor(os.path.join(model_dir, cfg.model.weights), cfg.model,
                                                self.device, cfg.runtime.quantization)

    def warm_up_requests(self):
        """A full-size batch of valid rows: the training means, as objects and as lists."""
        params = self.regressor.params
        names, mean = params.feature_names, [float(v) for v in params.mean]
        return [{"body": dict(zip(names, mean)) if i % 2 == 0 else [mean]} for i in range(self.max_batch)]

    def warm_up_answered(self, answer):
        return isinstance(answer, dict) and "predictions" in answer and np.isfinite(answer["predictions"]).all()

    def prepare(self, request):
        return tabular.rows_of(request, self.regressor.params.feature_names, self.config.max_rows)

    def forward(self, requests_rows):
        regressor = self.regressor
        inputs = tabular.standardize(np.concatenate(requests_rows), regressor.params)
        return tabular.predict(regressor.model, inputs, regressor.device)

    def answer(self, requests_rows, outputs):
        counts = [len(rows) for rows in requests_rows]
        return tabular.format_predictions(outputs, counts, self.regressor.params, self.regressor.version)

    def describe(self):
        return {"quantization": self.config.runtime.quantization,
                "feature_names": list(self.regressor.params.feature_names),
                "version": self.regressor.version, "max_rows": self.config.max_rows}
