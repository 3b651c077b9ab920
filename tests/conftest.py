import contextlib
import os
import shutil
import zipfile
from typing import Optional, Sequence

import pytest

# The project is installed (editable, pyproject.toml): scripts, models and handler_kit import by
# name. handler_kit is imported here, first, so that the tests use the source package even after
# an extracted archive folder (which holds its own copy) joins the import path as in a worker.
import handler_kit  # noqa: F401
from models.catalog import MODEL_STORE, load_catalog
from scripts.serving.ts_server import TorchServe, check_java


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


# -- real TorchServes for the integration modules ---------------------------------------------------
def require_java() -> None:
    """Integration tests fail (not skip) without Java 17: make test installs it."""
    try:
        check_java()
    except SystemExit as exc:
        pytest.fail(str(exc))


class TorchServeFactory:
    """Starts the real TorchServes of the integration modules and guarantees that each one stops.

    ``start(...)`` is a context manager: a TorchServe configured as config.properties is (the
    catalog's server settings and metrics config), on free 127.0.0.1 ports, in a home of its own,
    with the requested archives registered and READY; it is stopped when the block ends, whatever
    happened. ``running(server)`` does the starting and stopping for a server made otherwise (KServe's
    runtime rehearsal, the gateway rehearsal). Any server still running when the session ends (a
    block that was never closed) is stopped then.

        with torchserve_factory.start("ts-versions", models=["digits"]) as ts:
            yield ts
    """

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.running_servers = []

    @contextlib.contextmanager
    def running(self, server, log_tail=None):
        """``server`` (start(), stop(), log_tail()) started, yielded, and stopped at the end. An
        error while it starts or inside the block prints its logs' tail (or ``log_tail()``'s)."""
        require_java()
        self.running_servers.append(server)
        try:
            server.start()
            yield server
        except Exception:
            print((log_tail or server.log_tail)())
            raise
        finally:
            try:
                server.stop()
            finally:
                self.running_servers.remove(server)

    @contextlib.contextmanager
    def start(self, name: str = "ts", *, models: Sequence = (), catalog=None, store: Optional[str] = None,
              load_models: bool = False, wait_for: Sequence[str] = (), ready_timeout: float = 180.0,
              env: Optional[dict] = None, **overrides):
        """A TorchServe in a fresh home ``name``, serving ``store`` (default: model_store/).

        models: registered in this order, each synchronously through the management API; an item is
          a catalog model name or ModelEntry (its archive, with its catalog settings) or a pair
          (archive file name, registration parameters) for anything else (a copy under another
          name, other batching). The block starts once every one of them, and ``wait_for``
          (names, or name/version), has a READY worker.
        load_models: the catalog's load_models/models= start with the server, as in `make serve`.
        env: environment changes for the server (None removes a variable).
        overrides: config.properties settings (allowed_urls, token_expiration_min...).
        """
        catalog = load_catalog() if catalog is None else catalog
        server = TorchServe.from_catalog(str(self.tmp_path_factory.mktemp(name)), catalog,
                                         store or MODEL_STORE, load_models=load_models,
                                         extra_env=env, **overrides)
        with self.running(server):
            names = []
            for model in models:
                if isinstance(model, tuple):
                    archive, params = model
                    names.append(params.get("model_name") or archive[:-len(".mar")])
                else:
                    entry = catalog.model(model) if isinstance(model, str) else model
                    archive, params = entry.mar_name, entry.registration()
                    names.append(entry.name)
                server.client.register(archive, synchronous="true", **params)
            if names or wait_for:
                server.client.wait_ready([*names, *wait_for], ready_timeout)
            yield server

    def stop_all(self) -> None:
        for server in list(reversed(self.running_servers)):
            with contextlib.suppress(Exception):
                server.stop()
        self.running_servers.clear()


@pytest.fixture(scope="session")
def torchserve_factory(tmp_path_factory):
    """The one way the tests start a real TorchServe (see TorchServeFactory)."""
    factory = TorchServeFactory(tmp_path_factory)
    yield factory
    factory.stop_all()
