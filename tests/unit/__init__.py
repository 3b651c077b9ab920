"""Tests by layer: unit tests: no server, no archive."""
