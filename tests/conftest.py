import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own best-config cache, so tuned entries never leak between tests."""
    monkeypatch.setenv("TINYPALLAS_CACHE", str(tmp_path / "best_configs.json"))


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (runs compiled Triton / Mosaic GPU kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
