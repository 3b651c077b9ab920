"""The tolerant answer comparison the tests use across batches and CPUs (tests/answers.py): it
accepts kernel rounding and refuses a different answer."""
from tests.answers import answers_close, summaries_close


def topk(*pairs):
    return [{"label": label, "index": int(label), "probability": p} for label, p in pairs]


def test_rounding_in_the_last_decimals_is_the_same_answer():
    alone = topk(("8", 0.995762), ("1", 0.002113), ("9", 0.001004))
    in_a_batch = topk(("8", 0.995761), ("1", 0.002114), ("9", 0.001004))
    assert answers_close(alone, in_a_batch)


def test_another_version_is_another_answer():
    v1 = topk(("8", 0.995762), ("1", 0.002113), ("9", 0.001004))
    v2 = topk(("8", 0.981220), ("1", 0.012113), ("9", 0.001004))
    assert not answers_close(v1, v2)
    assert not answers_close(v1, topk(("1", 0.995762), ("8", 0.002113), ("9", 0.001004)))
    assert not answers_close(v1, v1[:2])


def test_near_ties_may_swap_and_the_last_label_may_change():
    a = topk(("3", 0.5), ("5", 0.24995), ("2", 0.24990), ("7", 0.00001))
    b = topk(("3", 0.5), ("2", 0.24991), ("5", 0.24994), ("4", 0.00001))
    assert answers_close(a, b)
    far = topk(("3", 0.5), ("2", 0.24991), ("5", 0.24994), ("4", 0.01))
    assert not answers_close(a, far)


def test_embeddings_and_predictions():
    assert answers_close({"embeddings": [[0.6, 0.8]], "model": "m"}, {"embeddings": [[0.60001, 0.79999]], "model": "m"})
    assert not answers_close({"embeddings": [[0.6, 0.8]], "model": "m"}, {"embeddings": [[0.8, 0.6]], "model": "m"})
    assert not answers_close({"embeddings": [[0.6, 0.8]], "model": "m"}, {"embeddings": [[0.6, 0.8]], "model": "n"})
    assert answers_close({"predictions": [200.771]}, {"predictions": [200.7705]})
    assert not answers_close({"predictions": [200.77]}, {"predictions": [201.0]})


def test_printed_summaries():
    assert summaries_close("384-d [0.0123, -0.0457, 0.1000, ...]", "384-d [0.0124, -0.0456, 0.1000, ...]")
    assert not summaries_close("384-d [0.0123, -0.0457, ...]", "384-d [0.0153, -0.0457, ...]")
    assert summaries_close("151.23, 88.10", "151.24, 88.10")
    assert not summaries_close("151.23", "152.23")
    assert summaries_close("vacuum", "vacuum") and not summaries_close("vacuum", "palace")
