"""Keras models: naming, weights (and saying which), family preprocessing, fixed-size batches."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from node_image.worker import model as model_module
from node_image.worker.errors import TaskConfigError
from node_image.worker.model import (
    RANDOM_INIT,
    InferenceBatcher,
    LoadedModel,
    load_model,
    parse_model_spec,
)
from tests.worker_tasks import save_tiny_model

# Keras's own TensorFlow backend trips NumPy 2's copy-keyword notice when saving models.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.keras")


def test_model_names_parse() -> None:
    assert parse_model_spec("ResNet50") == model_module.ModelSpec("application", "ResNet50")
    assert parse_model_spec("ResNet50@/w/r.weights.h5").weights_path == "/w/r.weights.h5"
    assert parse_model_spec("/models/mine.keras").kind == "file"
    with pytest.raises(TaskConfigError, match="neither"):
        parse_model_spec("not a model!")


def test_keras_file_model_sets_the_frame_size_and_reports_its_file(tiny_model: Path) -> None:
    loaded = load_model(str(tiny_model), frame_size=(224, 224))
    assert (loaded.input_height, loaded.input_width) == (32, 32)  # the model's own input
    assert loaded.feature_dim == 8
    assert loaded.weights.startswith(str(tiny_model)) and "sha256" in loaded.weights
    assert loaded.pretrained
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    features = loaded.predict(frames)
    assert features.shape == (5, 8) and features.dtype == np.float32


def test_application_without_weights_says_random_init_plainly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_model("MobileNetV3Small", frame_size=(64, 64), weights_dir=tmp_path)
    assert loaded.weights.startswith(RANDOM_INIT)
    assert "MobileNetV3Small" in loaded.weights and str(tmp_path) in loaded.weights
    assert not loaded.pretrained
    assert "RANDOM weights" in caplog.text
    assert loaded.predict(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, loaded.feature_dim)


def test_application_loads_baked_weights_from_the_weights_dir(tmp_path: Path) -> None:
    import keras

    # Stand in for `--bake-weights` (which needs the internet): save a model's weights where
    # the worker looks, then check the loaded model computes exactly what that model does.
    reference = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, pooling="avg", input_shape=(64, 64, 3)
    )
    reference.save_weights(str(tmp_path / "MobileNetV3Small.weights.h5"))
    loaded = load_model("MobileNetV3Small", frame_size=(64, 64), weights_dir=tmp_path)
    assert loaded.pretrained and str(tmp_path) in loaded.weights
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    expected = reference.predict_on_batch(frames.astype(np.float32))
    np.testing.assert_allclose(loaded.predict(frames), expected, rtol=1e-4, atol=1e-4)
    # The same file named explicitly works too; a missing one is a configuration error.
    explicit = load_model(
        f"MobileNetV3Small@{tmp_path / 'MobileNetV3Small.weights.h5'}", frame_size=(64, 64)
    )
    assert explicit.pretrained
    with pytest.raises(TaskConfigError, match="does not exist"):
        load_model(f"MobileNetV3Small@{tmp_path / 'nope.weights.h5'}", frame_size=(64, 64))


def test_preprocessing_matches_the_family() -> None:
    pixel = np.array([[[[255.0, 0.0, 0.0]]]], np.float32)
    resnet = model_module._family_preprocess("ResNet50")(pixel.copy())
    # caffe mode: RGB -> BGR minus the ImageNet means.
    np.testing.assert_allclose(resnet[0, 0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-3)
    mobilenet_v2 = model_module._family_preprocess("MobileNetV2")(pixel.copy())
    np.testing.assert_allclose(mobilenet_v2[0, 0, 0], [1.0, -1.0, -1.0])  # tf mode: [-1, 1]
    # MobileNetV3 and EfficientNet rescale inside the model: their preprocess is identity.
    v3 = model_module._family_preprocess("MobileNetV3Small")(pixel.copy())
    np.testing.assert_allclose(v3, pixel)


def test_bad_models_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskConfigError, match="unknown model"):
        load_model("NoSuchNet", frame_size=(64, 64))
    with pytest.raises(TaskConfigError, match="does not exist"):
        load_model(str(tmp_path / "missing.keras"), frame_size=(64, 64))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(TaskConfigError, match="cannot load"):
        load_model(str(broken), frame_size=(64, 64))


# -- fixed-size batches that mix videos -----------------------------------------------------------
class _RecordingModel:
    """A stand-in model: feature = the frame's first pixel value; records batch shapes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        self.batches.append(len(frames))
        return frames[:, 0, 0, :1].astype(np.float32)


def _fake(recorder: _RecordingModel) -> LoadedModel:
    return LoadedModel("fake", "none", 4, 4, 1, "numpy", [], recorder)


def _frames(values: range) -> np.ndarray:
    return np.stack([np.full((4, 4, 3), v % 256, np.uint8) for v in values])


def test_batches_are_fixed_size_and_mix_frames_of_several_videos() -> None:
    recorder = _RecordingModel()
    batcher = InferenceBatcher(_fake(recorder), batch_size=8, linger_s=0.02).start()
    lengths = {"a": 5, "b": 7, "c": 3}
    results: dict[str, np.ndarray] = {}
    start = {"a": 0, "b": 100, "c": 200}

    def video(name: str) -> None:
        stream = batcher.open_stream()
        values = range(start[name], start[name] + lengths[name])
        for chunk in (values[:2], values[2:]):
            stream.put(_frames(chunk))
        results[name] = stream.finish(timeout=10)

    threads = [threading.Thread(target=video, args=(name,)) for name in lengths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    batcher.stop()
    assert set(recorder.batches) == {8}, "every batch has the fixed size (padded if partial)"
    assert len(recorder.batches) < sum((n + 7) // 8 for n in lengths.values()), "videos share"
    assert len(recorder.batches) == 2  # 15 frames -> 2 batches of 8
    for name, n in lengths.items():
        expected = np.arange(start[name], start[name] + n, dtype=np.float32)
        np.testing.assert_array_equal(results[name][:, 0], expected)
    assert batcher.padded_frames == 1


def test_a_finished_video_does_not_wait_for_a_full_batch() -> None:
    recorder = _RecordingModel()
    batcher = InferenceBatcher(_fake(recorder), batch_size=32, linger_s=0.01).start()
    stream = batcher.open_stream()
    stream.put(_frames(range(3)))
    features = stream.finish(timeout=5)
    batcher.stop()
    assert features.shape == (3, 1)
    assert recorder.batches == [32]
    assert stream.inference_s > 0


def test_an_empty_video_finishes_with_no_rows() -> None:
    batcher = InferenceBatcher(_fake(_RecordingModel()), batch_size=4).start()
    assert batcher.open_stream().finish(timeout=5).shape == (0, 1)
    batcher.stop()


def test_a_failing_model_fails_the_streams_in_the_batch() -> None:
    def boom(frames: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")

    batcher = InferenceBatcher(LoadedModel("x", "none", 4, 4, 1, "numpy", [], boom), 2).start()
    stream = batcher.open_stream()
    stream.put(_frames(range(3)))
    with pytest.raises(model_module.InferenceError, match="out of memory"):
        stream.finish(timeout=5)
    batcher.stop()


def test_a_worker_imports_keras_without_matplotlib_and_a_task_may_still_plot() -> None:
    # Keras imports matplotlib.pyplot at its own import when it is installed (it is here:
    # the app's extra): 0.36 s of every worker's start. A fresh interpreter, as a node's.
    script = (
        "import sys\n"
        "from node_image.worker.model import import_keras\n"
        "import_keras()\n"
        "assert 'keras' in sys.modules\n"
        "assert 'matplotlib' not in sys.modules\n"
        "import matplotlib.pyplot\n"  # a user's task that plots still can
        "print('ok')\n"
    )
    _assert_prints_ok(script, timeout_s=300)


def test_frames_taken_while_the_model_is_built_are_inferred_once_it_is() -> None:
    # A standby worker's model may still be building when its first items decode: the
    # batcher takes their frames at once and runs them when the model arrives.
    recorder = _RecordingModel()
    built: Future[LoadedModel] = Future()
    batcher = InferenceBatcher(built, batch_size=4, input_size=(4, 4), linger_s=0.01).start()
    results: list[np.ndarray] = []
    stream = batcher.open_stream()
    stream.put(_frames(range(6)))  # accepted with no model yet
    finisher = threading.Thread(target=lambda: results.append(stream.finish(timeout=10)))
    finisher.start()
    time.sleep(0.2)
    assert not results and not recorder.batches  # waiting for the model, not failing
    built.set_result(_fake(recorder))
    finisher.join(10)
    batcher.stop()
    np.testing.assert_array_equal(results[0][:, 0], np.arange(6, dtype=np.float32))
    assert batcher.model.name == "fake"


def test_a_model_that_fails_to_build_fails_the_frames_waiting_for_it() -> None:
    built: Future[LoadedModel] = Future()
    batcher = InferenceBatcher(built, batch_size=4, input_size=(4, 4), linger_s=0.01).start()
    stream = batcher.open_stream()
    stream.put(_frames(range(3)))
    built.set_exception(TaskConfigError("weights do not fit"))
    with pytest.raises(model_module.InferenceError, match="weights do not fit"):
        stream.finish(timeout=10)
    batcher.stop()
    with pytest.raises(ValueError, match="input_size"):
        InferenceBatcher(Future(), batch_size=4)


def test_matplotlib_is_hidden_from_the_keras_import_thread_only() -> None:
    # A standby worker imports Keras on a thread while its run may import a user's task that
    # plots: that task's import must not fail. A fresh interpreter (matplotlib not imported).
    script = (
        "import importlib, threading\n"
        "from node_image.worker.model import _plotting_hidden\n"
        "other = []\n"
        "with _plotting_hidden():\n"
        "    try:\n"
        "        import matplotlib\n"
        "        print('imported on the hiding thread')\n"
        "    except ImportError:\n"
        "        pass\n"
        "    load = lambda: other.append(importlib.import_module('matplotlib'))\n"
        "    t = threading.Thread(target=load)\n"
        "    t.start(); t.join()\n"
        "assert other and other[0].__name__ == 'matplotlib'\n"
        "print('ok')\n"
    )
    _assert_prints_ok(script, timeout_s=120)


def _assert_prints_ok(script: str, *, timeout_s: float) -> None:
    """Run ``script`` in a fresh interpreter (nothing imported yet) from the repository's
    root; it must exit 0 having printed only ``ok``."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr[-2000:]


def test_a_batch_of_any_size_is_inferred_by_one_trace_with_keras_own_outputs() -> None:
    """predict_on_batch traces again, relaxed, for the first batch of a second size (0.7 s
    of one core at every local run's start): batch_inference traces once, and its outputs
    are Keras' own, bit for bit."""
    import keras

    network = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, pooling="avg", input_shape=(64, 64, 3)
    )
    infer = model_module.batch_inference(keras, network, 64, 64, gpus=[])
    rng = np.random.default_rng(5)
    for size in (32, 10, 7, 32, 1):
        batch = rng.uniform(0, 255, (size, 64, 64, 3)).astype(np.float32)
        ours = np.asarray(infer(batch), np.float32)
        assert ours.shape == (size, 576)
        np.testing.assert_array_equal(ours, np.asarray(network.predict_on_batch(batch)))
    assert infer.experimental_get_tracing_count() == 1  # type: ignore[attr-defined]
    # With GPUs Keras' own path stays: it compiles with XLA there, this function would not.
    on_gpu = model_module.batch_inference(keras, network, 64, 64, gpus=["/physical_device:GPU:0"])
    assert on_gpu == network.predict_on_batch
