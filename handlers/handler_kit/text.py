"""Text-embedding stages as plain functions: request -> texts -> tokens -> model -> pooled vectors
-> response bodies; plus loading the model folder an archive ships.

A sentence-transformers model such as all-MiniLM-L6-v2 is a BERT encoder followed by mean pooling
over the real (non-padding) tokens and L2 normalization; that is what these stages reproduce with
plain transformers, so no sentence-transformers package is needed in the worker.
"""
import json
import os
from typing import List, Sequence

import torch

from handler_kit import wire
from handler_kit.batching import split_counts
from handler_kit.errors import BadInput, ConfigError, PayloadTooLarge

# Where a request may carry its texts: the wire's usual payload fields, then text-specific names
# a multipart form may use.
TEXT_FIELDS = wire.PAYLOAD_FIELDS + ("text", "texts", "inputs")
INPUTS_KEY = "inputs"
# Files a model folder must hold; the weights must be safetensors (a pickled .bin is never loaded).
REQUIRED_MODEL_FILES = ("config.json", "tokenizer_config.json", "model.safetensors")


# ---------------------------------------------------------------------------------------------
# request -> texts


def _decode_body(value: bytes):
    """A raw body: JSON when it looks like JSON (a client that forgot the content type), else
    UTF-8 text."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"request body is not UTF-8 text (invalid byte at position {exc.start}); "
                       "send UTF-8 encoded text") from None
    if text.lstrip()[:1] in ("{", "["):
        # TorchServe forwards the raw bytes when a JSON body does not parse.
        try:
            return json.loads(text)
        except RecursionError:  # e.g. "[" * 100000: TorchServe's own parse gave up the same way
            raise BadInput("JSON body is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise BadInput(f"body was sent as JSON but is not valid JSON: {exc}; send plain "
                           "text with Content-Type text/plain to embed it as it is") from None
    return text


def _texts_from_json(value) -> list:
    """A parsed JSON body -> list of candidate texts (checked by the caller)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {INPUTS_KEY})
        if unknown or INPUTS_KEY not in value:
            found = ", ".join(sorted(value)) or "none"
            raise BadInput(f"JSON object must be {{\"inputs\": [\"text\", ...]}} or {{\"inputs\": \"text\"}}; "
                           f"found keys: {found}")
        value = value[INPUTS_KEY]
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise BadInput(f"JSON field 'inputs' must be a string or a list of strings, "
                           f"got {type(value).__name__}")
        return value
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise BadInput(f"JSON body must be a list of strings or {{\"inputs\": [...]}}, got {type(value).__name__}")


def check_texts(texts: list, max_texts: int, max_chars: int) -> List[str]:
    """Every reason a list of texts cannot be embedded, as a 400 (shape) or 413 (size)."""
    if not texts:
        raise BadInput("no texts to embed: the list is empty")
    if len(texts) > max_texts:
        raise BadInput(f"{len(texts)} texts in one request, above the limit of {max_texts}; "
                       "split them over several requests")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadInput(f"text {i} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadInput(f"text {i} is empty")
        if len(text) > max_chars:
            raise PayloadTooLarge(f"text {i} has {len(text)} characters, above the limit of "
                                  f"{max_chars} characters")
    return list(texts)


def texts_of(request, max_texts: int, max_chars: int) -> List[str]:
    """One request's texts, whatever the wire format: a raw UTF-8 body or text/* (one text), or
    JSON: "text", ["text", ...], {"inputs": "text"} or {"inputs": ["text", ...]}."""
    name, value = wire.payload_field(request, TEXT_FIELDS, (bytes, bytearray, str, dict, list),
                                     'the text as the request body, or JSON {"inputs": ["text", ...]}')
    if isinstance(value, (bytes, bytearray)):
        value = _decode_body(bytes(value))
        if isinstance(value, str):  # a raw text body is one text, JSON-looking or not
            return check_texts([value], max_texts, max_chars)
    if isinstance(value, str):
        return check_texts([value], max_texts, max_chars)
    if isinstance(value, (dict, list)):
        return check_texts(_texts_from_json(value), max_texts, max_chars)
    raise BadInput(f"field '{name}' has an unsupported type {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# texts -> tokens -> vectors


def tokenize_batch(tokenizer, texts: Sequence[str], max_length: int):
    """Tokens of all texts of a server-side batch, padded to the longest one (not to max_length:
    short sentences stay cheap), cut at max_length tokens. Returns (inputs, truncated flags)."""
    inputs = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt")
    return inputs, truncated_flags(inputs, tokenizer, texts, max_length)


def truncated_flags(inputs, tokenizer, texts: Sequence[str], max_length: int) -> List[bool]:
    """Which texts lost tokens to max_length."""
    encodings = getattr(inputs, "encodings", None)
    if encodings:  # a fast (Rust) tokenizer keeps what truncation cut off
        return [len(encoding.overflowing) > 0 for encoding in encodings]
    # A Python tokenizer: count the full token lengths (texts are bounded by max_chars).
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    return [n > max_length for n in lengths]


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors of each text, padding excluded; float32 whatever the model ran in."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (last_hidden_state.to(torch.float32) * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-length rows, so that a dot product is the cosine similarity."""
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def embed(model, inputs, device: torch.device) -> torch.Tensor:
    """Unit-norm float32 embeddings (on the CPU) of a tokenized batch; the caller sets no_grad and
    autocast."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    hidden = model(**inputs).last_hidden_state
    return l2_normalize(mean_pool(hidden, inputs["attention_mask"])).cpu()


def format_embeddings(embeddings: torch.Tensor, truncated: Sequence[bool], counts: Sequence[int],
                      model_name: str, version: str) -> List[dict]:
    """Response body of each request: its vectors in request order, and which texts were cut."""
    dimension = int(embeddings.shape[1])
    return [{"embeddings": vectors.tolist(), "dimension": dimension, "model": model_name,
             "version": version, "truncated": [bool(t) for t in cut]}
            for vectors, cut in zip(split_counts(embeddings, counts), split_counts(list(truncated), counts))]


# ---------------------------------------------------------------------------------------------
# loading the model folder


def check_model_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise ConfigError(f"model folder {os.path.basename(folder)!r} (handler.model.path) is missing "
                          "from the archive")
    missing = [f for f in REQUIRED_MODEL_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ConfigError(f"model folder {os.path.basename(folder)!r} lacks {', '.join(missing)}")


def load_tokenizer_and_model(folder: str, device: torch.device):
    """Tokenizer and encoder from a local folder only: never the hub, never pickled weights,
    never code shipped with the model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads its settings
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a progress bar per load only clutters worker logs
    check_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                      trust_remote_code=False, dtype=torch.float32)
    return tokenizer, model.to(device).eval()


def check_max_length(max_length: int, tokenizer, model) -> None:
    """max_length must leave room for the special tokens and fit the position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ConfigError(f"model-config.yaml: 'handler.max_length' is {max_length}; it must exceed the "
                          f"{special} special tokens the tokenizer adds")
    if limit is not None and max_length > limit:
        raise ConfigError(f"model-config.yaml: 'handler.max_length' is {max_length}, above the model's "
                          f"{limit} positions (max_position_embeddings)")
