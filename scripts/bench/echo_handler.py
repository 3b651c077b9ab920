"""The benchmark's echo handler: answers "ok" to every request of a batch, with no model and no work.

scripts/bench/served.py packages it into echo.mar (torch-model-archiver, no serialized file) and serves it
with the light models' batching; its throughput is TorchServe's own per-request ceiling on the
machine (frontend, batching, the worker's socket, the client), which no handler can pass.
"""
from ts.torch_handler.base_handler import BaseHandler


class EchoHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        return ["ok"] * len(data)
