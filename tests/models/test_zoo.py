"""models.zoo: reference models are found through $TINYPALLAS_MODELS, then ../shared/tflite beside
the repository, whatever the working directory; absent ones are named with how to get them, and
the stand-ins built in their place are deterministic."""
import pytest

from models import tflite_import, zoo

KWS = "mlperf_tiny_kws01_dscnn_int8"


@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    """A checkout without ../shared: only $TINYPALLAS_MODELS (an empty folder here) is searched."""
    monkeypatch.setattr(zoo, "DEFAULT_DIR", tmp_path / "no-shared" / "tflite")
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv(zoo.ENV, str(models))
    return models


def test_missing_reference_model_says_where_it_looked_and_how_to_get_it(no_shared):
    with pytest.raises(zoo.MissingModelError) as e:
        zoo.reference(KWS)
    message = str(e.value)
    assert f"{KWS}.tflite" in message and "keyword_spotting/trained_models/kws_ref_model.tflite" in message
    assert str(no_shared) in message and "(missing)" in message and "$TINYPALLAS_MODELS" in message
    assert "README.md" in message and "Reference models" in message
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)


def test_without_reference_models_the_suite_runs_on_stand_ins(no_shared, tmp_path):
    assert zoo.references() == [] and zoo.suite_models() == list(zoo.STAND_INS)
    assert zoo.available(KWS, "mlperf_tiny_sww01_streaming_wakeword_int8") == ["standin_ds_cnn_kws_int8"]
    path = zoo.model(KWS, tmp_path / "cache")
    assert path.name == "standin_ds_cnn_kws_int8.tflite"
    graph = tflite_import.load(path)
    assert graph.op_kinds() == {"CONV_2D": 5, "DEPTHWISE_CONV_2D": 4, "AVERAGE_POOL_2D": 1, "RESHAPE": 1,
                                "FULLY_CONNECTED": 1, "SOFTMAX": 1}  # the MLPerf Tiny KWS topology
    assert graph.tensors[graph.inputs[0]].shape == (1, 49, 10, 1)


def test_stand_ins_are_deterministic_and_cached(tmp_path):
    first = zoo.stand_in("standin_fc_autoencoder_ad_int8", tmp_path / "a")
    again = zoo.stand_in("standin_fc_autoencoder_ad_int8", tmp_path / "b")
    assert first.read_bytes() == again.read_bytes()
    mtime = first.stat().st_mtime_ns
    assert zoo.stand_in("standin_fc_autoencoder_ad_int8", tmp_path / "a") == first
    assert first.stat().st_mtime_ns == mtime  # found, not rebuilt
    with pytest.raises(ValueError, match="unknown stand-in 'nope'; choose one of: standin_"):
        zoo.stand_in("nope", tmp_path)


def test_models_env_comes_first_and_the_working_directory_does_not_matter(no_shared, tmp_path, monkeypatch):
    built = zoo.stand_in("standin_ds_cnn_kws_int8", tmp_path / "cache")
    (no_shared / f"{KWS}.tflite").write_bytes(built.read_bytes())
    monkeypatch.chdir(tmp_path / "cache")
    assert zoo.reference(KWS) == no_shared / f"{KWS}.tflite"
    assert zoo.resolve(KWS) == zoo.resolve(f"{KWS}.tflite") == no_shared / f"{KWS}.tflite"
    assert zoo.references() == [KWS] and zoo.available(KWS) == [KWS]
    assert zoo.resolve(str(built)) == built
    with pytest.raises(ValueError, match="model 'nope.tflite' not found; pass a .tflite file or a reference model"):
        zoo.resolve("nope.tflite")
