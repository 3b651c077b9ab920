"""Small, separately testable stages shared by this project's TorchServe handlers.

The package travels inside every archive (the build script copies it next to the handler file),
so handlers import it by its top-level name both in the archive and in the tests.
"""
