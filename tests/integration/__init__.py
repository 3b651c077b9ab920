"""Tests by layer: against a real TorchServe (Java frontend and Python workers)."""
