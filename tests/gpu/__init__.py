"""Tests by layer: CUDA only; skipped where there is none."""
