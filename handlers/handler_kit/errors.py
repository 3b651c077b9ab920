"""Typed request errors: each carries the HTTP status TorchServe should answer with."""


class RequestError(Exception):
    """A problem with one request; only that request fails, the rest of its batch is answered."""

    status = 400
    kind = "bad_input"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_body(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}


class BadInput(RequestError):
    status = 400
    kind = "bad_input"


class PayloadTooLarge(RequestError):
    status = 413
    kind = "too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    kind = "unsupported_media_type"


class NotReady(RequestError):
    status = 503
    kind = "not_ready"


class OutOfMemory(NotReady):
    """503: the model ran out of accelerator memory even for this request alone."""
    kind = "out_of_memory"


class ConfigError(ValueError):
    """The archive's configuration is wrong; raised at load time so the worker never starts."""
