import os
import shutil
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "handlers")):
    if path not in sys.path:
        sys.path.insert(0, path)

from scripts.catalog import MODEL_STORE, load_catalog  # noqa: E402


@pytest.fixture(scope="session")
def catalog():
    return load_catalog()


@pytest.fixture(scope="session")
def model_store():
    """The archives `make build` produced; the tests use exactly those."""
    missing = [m.mar_name for m in load_catalog().models
               if not os.path.exists(os.path.join(MODEL_STORE, m.mar_name))]
    if missing:
        pytest.fail(f"archives {missing} are missing: run `make build` (make test does it)")
    return MODEL_STORE


@pytest.fixture(scope="session")
def extracted_archives(model_store, tmp_path_factory):
    """archive stem (digits, digits_v2.0, minilm_int8...) -> folder holding that archive's
    contents, as TorchServe unpacks it for a worker; extracted on first use."""
    return _ExtractedArchives(model_store, tmp_path_factory)


class _ExtractedArchives(dict):
    def __init__(self, model_store, tmp_path_factory):
        super().__init__()
        self.model_store, self.tmp_path_factory = model_store, tmp_path_factory

    def __missing__(self, stem):
        load_catalog().archive(stem)  # a CatalogError names the declared archives
        folder = self.tmp_path_factory.mktemp(f"mar-{stem}")
        with zipfile.ZipFile(os.path.join(self.model_store, f"{stem}.mar")) as archive:
            archive.extractall(folder)
        self[stem] = str(folder)
        return self[stem]


@pytest.fixture(scope="session")
def samples():
    from models import sample_data
    return sample_data


def java_available() -> bool:
    return shutil.which("java") is not None
