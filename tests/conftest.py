import pathlib

import jax
import pytest

from kernels.cpu import build as cpu_build
from models import zoo

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_CACHE = cpu_build.cache_dir()  # resolved before any test's cache folder is set


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own best-config cache, so tuned entries never leak between tests. The
    compiled CPU kernels are content-addressed: one build serves every test and child process."""
    monkeypatch.setenv("TINYPALLAS_CACHE", str(tmp_path / "best_configs.json"))
    monkeypatch.setenv("TINYPALLAS_KERNEL_CACHE", str(KERNEL_CACHE))


@pytest.fixture(scope="session")
def model_path(request, tmp_path_factory):
    """``model_path(name)``: reference model ``name`` (a stem of ``models.zoo.REFERENCES``) when it is
    present, else the stand-in built in its place; a stand-in name gives that stand-in. Stand-ins
    are built once and kept in pytest's cache folder (a temporary folder without the cache plugin)."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("tinypallas-models") if cache is not None else tmp_path_factory.mktemp("models")
    return lambda name: zoo.model(name, folder)


@pytest.fixture(scope="session")
def reference_model():
    """``reference_model(name)``: the reference file itself, for checks tied to its numbers; the
    test is skipped, with a reason that says how to get the file, when it is absent."""

    def get(name: str) -> pathlib.Path:
        try:
            return zoo.reference(name)
        except zoo.MissingModelError as e:
            pytest.skip(str(e))

    return get


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (runs compiled Triton / Mosaic GPU kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
