"""Tests by layer: a handler loaded in-process from a built archive, as a TorchServe worker loads it."""
