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
    """name -> folder holding that archive's contents, as TorchServe unpacks it for a worker."""
    out = {}
    for entry in load_catalog().models:
        folder = tmp_path_factory.mktemp(f"mar-{entry.name}")
        with zipfile.ZipFile(os.path.join(model_store, entry.mar_name)) as archive:
            archive.extractall(folder)
        out[entry.name] = str(folder)
    return out


@pytest.fixture(scope="session")
def samples():
    from models import sample_data
    return sample_data


def java_available() -> bool:
    return shutil.which("java") is not None
