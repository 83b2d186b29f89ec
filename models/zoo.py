"""Where the int8 .tflite models the tests, notebooks and benchmarks use come from.

Reference models (MLPerf Tiny, TinyEngine/MCUNet) are data files the repository does not hold: they
are looked up in ``$TINYPALLAS_MODELS``, then in ``../shared/tflite`` beside the repository (never
relative to the working directory). Where one is absent, a *stand-in* of the same topology is built
from ``models.builders``, quantized by ``models.ptq`` and written by ``models.tflite_export``:
deterministic, cached by content, a few seconds to build. README.md, "Reference models", says
where to download the reference files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable

ENV = "TINYPALLAS_MODELS"
REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO.parent / "shared" / "tflite"
HOW_TO_GET = (f"download the reference models (README.md, section 'Reference models', lists the sources) and set ${ENV} "
              "to their folder")

_TINY = "mlcommons/tiny @ 1afd2c98, benchmark/training/"
_TINYENGINE = "mit-han-lab/tinyengine @ 47bb283c, "
# file stem -> where the file comes from (repository @ commit, path): the table in README.md
REFERENCES: dict[str, str] = {
    "mlperf_tiny_vww01_mobilenetv1_0.25_96_int8": _TINY + "visual_wake_words/trained_models/vww_96_int8.tflite",
    "mlperf_tiny_ic01_resnet8_cifar10_int8": _TINY + "image_classification/trained_models/pretrainedResnet_quant.tflite",
    "mlperf_tiny_kws01_dscnn_int8": _TINY + "keyword_spotting/trained_models/kws_ref_model.tflite",
    "mlperf_tiny_ad01_fc_autoencoder_int8": _TINY + "anomaly_detection/trained_models/ad01_int8.tflite",
    "mlperf_tiny_ad01_fc_autoencoder_int8_floatio": _TINY + "anomaly_detection/trained_models/ToyCar/baseline_tf23/"
                                                            "model/model_ToyCar_quant_fullint.tflite",
    "mlperf_tiny_ic_resnet_large_cifar10_int8": _TINY + "image_classification/trained_models/"
                                                        "pretrainedResnet_large_int8.tflite",
    "mlperf_tiny_sww01_streaming_wakeword_int8": _TINY + "streaming_wakeword/trained_models/str_ww_ref_model.tflite",
    "tinyengine_mcunet_vww_80_int8_floatio": _TINYENGINE + "assets/vww.tflite",
    "tinyengine_mcunet_detection_fpn_128x160_int8_floatio": _TINYENGINE + "assets/detection.tflite",
}


class MissingModelError(FileNotFoundError, ValueError):
    """A model file that is not there (a ValueError too, for callers that refuse bad arguments)."""


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A model the project builds itself in place of the reference models ``stands_for``."""

    build: Callable[[], object]  # -> float models.ir.Graph
    stands_for: tuple[str, ...]
    float_io: bool = False


def _builders():
    from models import builders

    return builders


STAND_INS: dict[str, StandIn] = {
    # Same layer shapes as the MLPerf Tiny KWS and IC models, so shape-specific checks hold on both.
    "standin_ds_cnn_kws_int8": StandIn(lambda: _builders().ds_cnn(),
                                       ("mlperf_tiny_kws01_dscnn_int8", "mlperf_tiny_sww01_streaming_wakeword_int8")),
    "standin_resnet8_ic_int8": StandIn(lambda: _builders().resnet8(),
                                       ("mlperf_tiny_ic01_resnet8_cifar10_int8",
                                        "mlperf_tiny_ic_resnet_large_cifar10_int8")),
    "standin_fc_autoencoder_ad_int8": StandIn(lambda: _builders().fc_autoencoder(),
                                              ("mlperf_tiny_ad01_fc_autoencoder_int8",)),
    "standin_fc_autoencoder_ad_int8_floatio": StandIn(lambda: _builders().fc_autoencoder(),
                                                      ("mlperf_tiny_ad01_fc_autoencoder_int8_floatio",), True),
    # Float I/O like the TinyEngine models; its 112x112 float input alone (150 kB) overflows a
    # 128 kB board, as the detection model's does.
    "standin_mobilenet_v2_vww_int8_floatio": StandIn(lambda: _builders().mobilenet_v2(0.35, 112, 2),
                                                     ("mlperf_tiny_vww01_mobilenetv1_0.25_96_int8",
                                                      "tinyengine_mcunet_vww_80_int8_floatio",
                                                      "tinyengine_mcunet_detection_fpn_128x160_int8_floatio"),
                                                     True),
}


def search_path() -> list[pathlib.Path]:
    """The folders searched for reference models, in order."""
    env = os.environ.get(ENV)
    return [pathlib.Path(env).expanduser(), DEFAULT_DIR] if env else [DEFAULT_DIR]


def _stem(name: str) -> str:
    return name.removesuffix(".tflite")


def find(name: str) -> pathlib.Path | None:
    """The file of reference model ``name`` (stem or file name), or None when absent."""
    for folder in search_path():
        path = folder / f"{_stem(name)}.tflite"
        if path.is_file():
            return path
    return None


def references() -> list[str]:
    """Stems of the reference models present (known or not), sorted."""
    found = set()
    for folder in search_path():
        if folder.is_dir():
            found.update(p.stem for p in folder.glob("*.tflite"))
    return sorted(found)


def _where() -> str:
    return ", ".join(f"{p}{'' if p.is_dir() else ' (missing)'}" for p in search_path())


def reference(name: str) -> pathlib.Path:
    """The file of reference model ``name``; ``MissingModelError`` says how to get it."""
    path = find(name)
    if path is None:
        origin = REFERENCES.get(_stem(name))
        source = f" (from {origin})" if origin else ""
        raise MissingModelError(f"reference model {_stem(name)}.tflite{source} is not in {_where()}; {HOW_TO_GET}")
    return path


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "tinypallas" / "models"


def _build_key() -> str:
    """Changes whenever the code that builds, quantizes or writes a stand-in does."""
    import jax
    import numpy as np

    h = hashlib.sha256(f"{jax.__version__} {np.__version__}".encode())
    for path in [*sorted((REPO / "models").glob("*.py")), REPO / "kernels" / "quant.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stand_in(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The .tflite file of stand-in ``name``, built on first use and cached by content."""
    if name not in STAND_INS:
        raise ValueError(f"unknown stand-in {name!r}; choose one of: {', '.join(STAND_INS)}")
    folder = pathlib.Path(cache_dir or default_cache_dir()) / _build_key()
    path = folder / f"{name}.tflite"
    if path.is_file():
        return path
    import numpy as np

    from models import ptq, tflite_export

    spec = STAND_INS[name]
    graph = spec.build()
    shape = graph.tensors[graph.inputs[0]].shape[1:]
    calibration = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
    quantized = ptq.quantize(graph, [calibration], float_io=spec.float_io, per_channel_dense=False)
    quantized.name = name
    folder.mkdir(parents=True, exist_ok=True)
    # written whole then renamed: parallel test workers never read half a file
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tflite_export.to_bytes(quantized))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def stand_in_for(name: str) -> str | None:
    """The stand-in built in place of reference model ``name``, if there is one."""
    return next((s for s, spec in STAND_INS.items() if _stem(name) in spec.stands_for), None)


def model(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Reference model ``name`` if present, else its stand-in, built on first use. A stand-in's
    name says that it is one (``standin_...``); its figures are not the reference model's."""
    if _stem(name) in STAND_INS:
        return stand_in(_stem(name), cache_dir)
    path = find(name)
    if path is not None:
        return path
    substitute = stand_in_for(name)
    if substitute is None:
        reference(name)  # raises, saying how to get it
    return stand_in(substitute, cache_dir)


def available(*names: str) -> list[str]:
    """What ``model`` gives for each name, as names, without building anything: a reference
    model present stays itself, an absent one becomes its stand-in (repeats dropped)."""
    out: list[str] = []
    for name in map(_stem, names):
        name = name if name in STAND_INS or find(name) else (stand_in_for(name) or name)
        if name not in out:
            out.append(name)
    return out


def suite_models() -> list[str]:
    """What the bit-exactness and MCU checks run on: the reference models present, or every
    stand-in when there are none."""
    return references() or list(STAND_INS)


def resolve(model_or_name: str | os.PathLike) -> pathlib.Path:
    """A .tflite path as given, or the file of a reference model named by its stem."""
    path = pathlib.Path(model_or_name).expanduser()
    if path.is_file():
        return path
    if path.parent == pathlib.Path(".") and (_stem(path.name) in REFERENCES or find(path.name)):
        return reference(path.name)
    raise MissingModelError(f"model {str(model_or_name)!r} not found; pass a .tflite file or a reference model's name "
                            "(e.g. mlperf_tiny_kws01_dscnn_int8; README.md, 'Reference models', lists them)")
