"""Wire formats, decoded in one place: what TorchServe hands a handler for one request -> bytes.

TorchServe gives each request as a dict of parameters. A raw body (``curl -T``/``--data-binary``)
arrives as ``body`` (or ``data``); each multipart form field arrives under its own name; a JSON
body is already parsed into a dict/list unless its JSON was invalid (then it stays bytes).
"""
import base64
import binascii

from handler_kit.errors import BadInput

# Parameter names that can carry the payload, in order of preference.
PAYLOAD_FIELDS = ("data", "body", "file", "image", "input", "instances")
# Keys of a JSON object that may carry a base64 payload.
BASE64_KEYS = ("data", "image", "b64", "bytes")


def payload_field(request, fields=PAYLOAD_FIELDS, accepted=(bytes, bytearray, dict, list),
                  what: str = "the image as the request body, a multipart field, or JSON "
                              "{\"data\": \"<base64>\"}") -> tuple:
    """(name, value) of the one parameter carrying this request's payload: the first of
    ``fields`` present, else the only parameter of an ``accepted`` type (query-string
    parameters arrive as parameters too)."""
    if not isinstance(request, dict):
        raise BadInput("request could not be read")
    for name in fields:
        if request.get(name) is not None:
            return name, request[name]
    candidates = [(k, v) for k, v in request.items() if isinstance(v, accepted)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BadInput(f"request has no body: send {what}")
    names = ", ".join(sorted(k for k, _ in candidates))
    raise BadInput(f"request has several payload fields ({names}); send exactly one")


def decode_base64(text, field: str) -> bytes:
    if not isinstance(text, str):
        raise BadInput(f"JSON field '{field}' must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"JSON field '{field}' is not valid base64: {exc}") from None


def binary_payload(request: dict) -> bytes:
    """The binary payload of one request (an image, say), whatever the wire format."""
    name, value = payload_field(request)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        if value.lstrip()[:1] in (b"{", b"["):  # no image format starts like this
            # TorchServe forwards the raw bytes when a JSON body does not parse.
            raise BadInput("body was sent as JSON but is not valid JSON")
        if not value:
            raise BadInput("request body is empty")
        return value
    if isinstance(value, dict):
        for key in BASE64_KEYS:
            if key in value:
                data = decode_base64(value[key], key)
                if not data:
                    raise BadInput(f"JSON field '{key}' decodes to zero bytes")
                return data
        keys = ", ".join(BASE64_KEYS)
        raise BadInput(f"JSON body needs one of the keys {keys} holding base64 data")
    if isinstance(value, str):
        if not value:
            raise BadInput("request body is empty")
        if name in BASE64_KEYS:  # a JSON object's field, e.g. a KServe v1 instance {"data": "<base64>"}
            return decode_base64(value, name)
        raise BadInput(f"field '{name}' is text; send binary data, or JSON {{\"data\": \"<base64>\"}}")
    if isinstance(value, list):
        raise BadInput("JSON body must be an object such as {\"data\": \"<base64>\"}, not a list")
    raise BadInput(f"field '{name}' has an unsupported type {type(value).__name__}")
