"""Keras 3: load the run's model once per process and run it on fixed-size batches.

A model is named in ``RunOptions.model`` as one of:

- a ``keras.applications`` class name (``MobileNetV3Small``, ``ResNet50``...), built without
  its classifier (``include_top=False, pooling="avg"``), so it yields one feature vector per
  frame. Its weights come from ``<weights_dir>/<Name>.weights.h5`` when the image baked them
  in (``python -m worker --bake-weights``), else the model is randomly initialized and the
  logs, the per-item metadata and ``weights`` say so plainly: offline (here, and in local
  mode) nothing can be downloaded. Frames get the family's own ``preprocess_input``.
- ``Name@/path/to/file.weights.h5``: the same, with weights from that file.
- a path to a ``.keras`` file: the whole model. It receives float32 RGB in [0, 255] and does
  its own preprocessing (e.g. a ``Rescaling`` layer); spatial outputs are averaged to vectors.

The backend is Keras's own choice (``KERAS_BACKEND``; TensorFlow by default).

:class:`InferenceBatcher` feeds the model fixed-size batches (one compiled shape, no
retracing) that mix frames from every video in flight, so short videos do not leave the
accelerator half-empty, and partial batches run only when a finished video waits on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.abc
import inspect
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import RetryableError, TaskConfigError

log = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".weights.h5"
RANDOM_INIT = "random-init"

Frames = npt.NDArray[np.uint8]
Features = npt.NDArray[np.float32]


# -- naming a model -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``RunOptions.model``."""

    kind: str  # "application" | "file"
    name: str
    weights_path: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.kind == "application" else Path(self.name).name


def parse_model_spec(text: str) -> ModelSpec:
    """``Name``, ``Name@weights.h5`` or ``path/to/model.keras``."""
    value = text.strip()
    if value.endswith(".keras"):
        return ModelSpec("file", value)
    name, _, weights = value.partition("@")
    if not name.isidentifier():
        raise TaskConfigError(
            f"model {text!r} is neither a keras.applications name (like MobileNetV3Small), "
            "'Name@weights.h5', nor a path to a .keras file"
        )
    return ModelSpec("application", name, weights or None)


# -- a loaded model -------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to run on uint8 RGB frames of ``input_height`` x ``input_width``."""

    name: str
    weights: str
    input_height: int
    input_width: int
    feature_dim: int
    backend: str
    devices: list[str]
    _predict: Callable[[Frames], Features] = field(repr=False)

    @property
    def pretrained(self) -> bool:
        return not self.weights.startswith(RANDOM_INIT)

    def predict(self, frames: Frames) -> Features:
        """Features (n, feature_dim) float32 for frames (n, H, W, 3) uint8."""
        return self._predict(frames)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "weights": self.weights,
            "input_size": [self.input_height, self.input_width],
            "feature_dim": self.feature_dim,
            "backend": self.backend,
            "devices": self.devices,
        }


def _keras() -> Any:
    # Imported on first use: importing Keras (and its backend) takes seconds, and the
    # worker's --help, settings errors and tests of the queue policy should not wait for it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _plotting_hidden():
        import keras

    return keras


@contextlib.contextmanager
def _plotting_hidden() -> Iterator[None]:
    """Keras imports matplotlib.pyplot at its own import when it is installed (for plotting
    helpers a node never calls): 0.36 s of every worker's start where the app's extra put it
    in the environment. While Keras imports, ``import matplotlib`` fails on this thread as
    if it were not installed. Other threads import it as usual meanwhile (a standby worker
    imports Keras on a thread while its run may import a user's task that plots), and so
    does this one afterwards."""
    finder = _RefuseOnThread("matplotlib", threading.get_ident())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _RefuseOnThread(importlib.abc.MetaPathFinder):
    """An import finder that makes ``package`` (and its modules) not found on one thread."""

    def __init__(self, package: str, thread: int) -> None:
        self.package = package
        self.thread = thread

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        refused = fullname == self.package or fullname.startswith(f"{self.package}.")
        if refused and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def import_keras() -> None:
    """Import Keras and its backend now (a standby worker, before its assignment)."""
    _keras()


def devices() -> list[str]:
    """Accelerators the backend sees (empty on a CPU-only machine)."""
    keras = _keras()
    backend = keras.backend.backend()
    with contextlib.suppress(Exception):
        if backend == "tensorflow":
            import tensorflow as tf

            return [device.name for device in tf.config.list_physical_devices("GPU")]
        if backend == "jax":
            jax = importlib.import_module("jax")
            return [str(d) for d in jax.devices() if d.platform != "cpu"]
        if backend == "torch":
            torch = importlib.import_module("torch")
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def application_names() -> list[str]:
    """Every model class ``keras.applications`` offers."""
    keras = _keras()
    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def _family_preprocess(name: str) -> Callable[[Any], Any]:
    """The ``preprocess_input`` of the family (submodule) that defines application ``name``."""
    keras = _keras()
    builder = getattr(keras.applications, name)
    # The public family module (keras.applications.resnet...) does not always re-export the
    # class (mobilenet_v3 does not), so the family is read from where the class is defined.
    family = str(getattr(builder, "__module__", "")).rsplit(".", 1)[-1]
    candidates = [getattr(keras.applications, family, None)]
    candidates += [
        getattr(keras.applications, attribute)
        for attribute in sorted(dir(keras.applications))
        if hasattr(getattr(keras.applications, attribute), name)
    ]
    for module in candidates:
        if inspect.ismodule(module):
            preprocess = getattr(module, "preprocess_input", None)
            if callable(preprocess):
                return preprocess  # type: ignore[no-any-return]
    raise TaskConfigError(f"no preprocess_input found for keras.applications.{name}")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def baked_weights_path(weights_dir: str | Path | None, name: str) -> Path | None:
    """Where the image keeps the weights of application ``name``, if it has them."""
    if not weights_dir:
        return None
    candidate = Path(weights_dir) / f"{name}{WEIGHTS_SUFFIX}"
    return candidate if candidate.is_file() else None


# A model a standby worker built before its assignment (``python -m worker --standby``),
# by the arguments it was built with: the next load_model call with the same arguments takes
# it instead of building another. One entry, taken once: nothing else is cached.
_PREPARED: dict[tuple[str, tuple[int, int], str | None, bool], LoadedModel] = {}
_PREPARED_LOCK = threading.Lock()
# Preparations announced (expect_preparation) and not yet ended: set when they end, built or
# not. load_model waits for one rather than building a second model beside it.
_PREPARING: dict[tuple[str, tuple[int, int], str | None, bool], threading.Event] = {}


def _prepared_key(
    model: str, frame_size: tuple[int, int], weights_dir: str | Path | None, mixed: bool
) -> tuple[str, tuple[int, int], str | None, bool]:
    size = (int(frame_size[0]), int(frame_size[1]))
    return model, size, None if weights_dir is None else str(weights_dir), mixed


def prepare_model(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None = None,
    mixed_precision: bool = False,
    batch_size: int,
) -> LoadedModel:
    """Build ``model`` and run one batch of ``batch_size`` through it (tracing it) now, for
    the next :func:`load_model` call with the same arguments to take. Ends a preparation
    :func:`expect_preparation` announced, whether it builds or raises."""
    key = _prepared_key(model, frame_size, weights_dir, mixed_precision)
    try:
        loaded = _build_model(
            model, frame_size=frame_size, weights_dir=weights_dir, mixed_precision=mixed_precision
        )
        loaded.predict(np.zeros((batch_size, loaded.input_height, loaded.input_width, 3), np.uint8))
        with _PREPARED_LOCK:
            _PREPARED.clear()
            _PREPARED[key] = loaded
        return loaded
    finally:
        _end(key)


def _end(key: tuple[str, tuple[int, int], str | None, bool]) -> None:
    with _PREPARED_LOCK:
        done = _PREPARING.pop(key, None)
    if done is not None:
        done.set()


def end_preparation(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None = None,
    mixed_precision: bool = False,
) -> None:
    """End an announced preparation that will not happen (nothing to do where
    :func:`prepare_model` ended it): whoever waits for it builds the model itself."""
    _end(_prepared_key(model, frame_size, weights_dir, mixed_precision))


def expect_preparation(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None = None,
    mixed_precision: bool = False,
) -> None:
    """Announce that :func:`prepare_model` will build this model (on another thread): until
    it ends, :func:`load_model` with the same arguments waits for it, and
    :func:`being_prepared` says so (the features task then takes its items meanwhile)."""
    with _PREPARED_LOCK:
        _PREPARING.setdefault(
            _prepared_key(model, frame_size, weights_dir, mixed_precision), threading.Event()
        )


def being_prepared(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None = None,
    mixed_precision: bool = False,
) -> bool:
    """Whether a model with these arguments is prepared already, or being prepared."""
    key = _prepared_key(model, frame_size, weights_dir, mixed_precision)
    with _PREPARED_LOCK:
        return key in _PREPARED or key in _PREPARING


def load_model(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None = None,
    mixed_precision: bool = False,
) -> LoadedModel:
    """Build or load the model named by ``model``; ``frame_size`` is (height, width). The
    one a standby worker prepared with these arguments, when there is one (waited for while
    its preparation goes on)."""
    key = _prepared_key(model, frame_size, weights_dir, mixed_precision)
    with _PREPARED_LOCK:
        preparing = _PREPARING.get(key)
    if preparing is not None:
        preparing.wait()
    with _PREPARED_LOCK:
        prepared = _PREPARED.pop(key, None)
    if prepared is not None:
        log.info("model %s: the one built before this worker's assignment", prepared.name)
        return prepared
    return _build_model(
        model, frame_size=frame_size, weights_dir=weights_dir, mixed_precision=mixed_precision
    )


def _build_model(
    model: str,
    *,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None,
    mixed_precision: bool,
) -> LoadedModel:
    keras = _keras()
    spec = parse_model_spec(model)
    gpus = devices()
    if mixed_precision and gpus:
        # float16 on GPUs only: on CPUs it is slower, not faster.
        keras.mixed_precision.set_global_policy("mixed_float16")
    if spec.kind == "file":
        return _load_file_model(keras, spec, frame_size, gpus)
    return _load_application(keras, spec, frame_size, weights_dir, gpus)


def batch_inference(
    keras: Any, network: Any, height: int, width: int, *, gpus: Sequence[str]
) -> Callable[[npt.NDArray[np.float32]], Any]:
    """The network's forward pass over a batch of any size, traced once.

    Keras' ``predict_on_batch`` traces its function for the first batch's shape and again,
    relaxed, for the first batch of another size: the prepared model's warm-up batch and a
    run's first short batch cost two traces (0.9 s and 0.7 s of one core, on the critical
    path of every local run's start). On a CPU under TensorFlow the pass is one
    ``tf.function`` with the batch dimension left open, traced once, with the same outputs.
    With GPUs ``predict_on_batch`` stays: Keras compiles it with XLA there (its
    ``jit_compile="auto"``), which this function would not; other backends keep it too.
    """
    if gpus or keras.backend.backend() != "tensorflow":
        return network.predict_on_batch  # type: ignore[no-any-return]
    import tensorflow as tf

    def forward(batch: Any) -> Any:
        return network(batch, training=False)

    return tf.function(  # type: ignore[no-any-return]
        forward,
        input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32)],
        autograph=False,  # a Keras model call: nothing for autograph to convert
    )


def _load_application(
    keras: Any,
    spec: ModelSpec,
    frame_size: tuple[int, int],
    weights_dir: str | Path | None,
    gpus: list[str],
) -> LoadedModel:
    builder = getattr(keras.applications, spec.name, None)
    if builder is None or not callable(builder) or not spec.name[:1].isupper():
        raise TaskConfigError(
            f"unknown model {spec.name!r}: not a keras.applications model "
            f"(e.g. {', '.join(application_names()[:6])}...)"
        )
    height, width = frame_size
    try:
        network = builder(
            include_top=False, weights=None, pooling="avg", input_shape=(height, width, 3)
        )
    except ValueError as error:
        raise TaskConfigError(f"cannot build {spec.name} for {height}x{width}: {error}") from error
    weights_file = (
        Path(spec.weights_path) if spec.weights_path else baked_weights_path(weights_dir, spec.name)
    )
    if spec.weights_path and (weights_file is None or not weights_file.is_file()):
        raise TaskConfigError(f"weights file {spec.weights_path} for {spec.name} does not exist")
    if weights_file is not None:
        try:
            network.load_weights(str(weights_file))
        except (ValueError, OSError) as error:
            raise TaskConfigError(
                f"weights {weights_file} do not fit {spec.name}: {error}"
            ) from error
        weights = f"{weights_file} (sha256 {file_digest(weights_file)})"
    else:
        where = f" in {weights_dir}" if weights_dir else " (no weights directory configured)"
        weights = (
            f"{RANDOM_INIT}: no weights file for {spec.name}{where}; features are not pretrained"
        )
        log.warning("model %s runs with RANDOM weights: %s", spec.name, weights)
    preprocess = _family_preprocess(spec.name)

    # One float32 input buffer, reused: a fresh 19 MB array per batch (224x224, 32 frames)
    # would make the allocator's footprint, not the video, set the worker's memory.
    inputs: dict[tuple[int, ...], npt.NDArray[np.float32]] = {}

    infer = batch_inference(keras, network, height, width, gpus=gpus)

    def predict(frames: Frames) -> Features:
        buffer = inputs.get(frames.shape)
        if buffer is None:
            buffer = inputs.setdefault(frames.shape, np.empty(frames.shape, np.float32))
        np.copyto(buffer, frames, casting="unsafe")
        batch = preprocess(buffer)
        return np.asarray(infer(batch), dtype=np.float32)

    return LoadedModel(
        name=spec.name,
        weights=weights,
        input_height=height,
        input_width=width,
        feature_dim=int(network.output_shape[-1]),
        backend=str(keras.backend.backend()),
        devices=gpus,
        _predict=predict,
    )


def _load_file_model(
    keras: Any, spec: ModelSpec, frame_size: tuple[int, int], gpus: list[str]
) -> LoadedModel:
    path = Path(spec.name)
    if not path.is_file():
        raise TaskConfigError(f"model file {path} does not exist")
    try:
        network = keras.saving.load_model(str(path), compile=False)
    except (ValueError, OSError, TypeError) as error:
        raise TaskConfigError(f"cannot load model file {path}: {error}") from error
    shape = tuple(network.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise TaskConfigError(
            f"model file {path} takes input {shape}; frames are (batch, height, width, 3)"
        )
    # A model with a fixed input size decides the frame size; otherwise the run's options do.
    height = int(shape[1]) if shape[1] else frame_size[0]
    width = int(shape[2]) if shape[2] else frame_size[1]
    infer = batch_inference(keras, network, height, width, gpus=gpus)
    probe = np.asarray(infer(np.zeros((1, height, width, 3), np.float32)), np.float32)
    feature_dim = int(np.prod(probe.shape[1:])) if probe.ndim <= 2 else int(probe.shape[-1])

    def predict(frames: Frames) -> Features:
        output = np.asarray(infer(frames.astype(np.float32)), np.float32)
        if output.ndim > 2:
            # Feature maps (n, h, w, c) -> one vector per frame, as pooling="avg" would.
            output = output.reshape(output.shape[0], -1, output.shape[-1]).mean(axis=1)
        return output.reshape(output.shape[0], -1)

    return LoadedModel(
        name=path.name,
        weights=f"{path} (sha256 {file_digest(path)})",
        input_height=height,
        input_width=width,
        feature_dim=feature_dim,
        backend=str(keras.backend.backend()),
        devices=gpus,
        _predict=predict,
    )


def bake_weights(names: Sequence[str], directory: Path) -> list[Path]:
    """Download ImageNet weights for ``names`` and save them where the worker looks.

    Runs at image build time (it needs the internet); the worker then loads
    ``<directory>/<Name>.weights.h5`` offline.
    """
    keras = _keras()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        builder = getattr(keras.applications, name)
        network = builder(include_top=False, weights="imagenet", pooling="avg")
        target = directory / f"{name}{WEIGHTS_SUFFIX}"
        network.save_weights(str(target))
        written.append(target)
    return written


# -- batching across videos -----------------------------------------------------------------
class InferenceError(RetryableError):
    """The model failed on a batch (out of memory, a backend error)."""


class FeatureStream:
    """One video's frames going in and its features coming out (see InferenceBatcher)."""

    def __init__(self, batcher: InferenceBatcher) -> None:
        self._batcher = batcher
        self._parts: list[Features] = []
        self._submitted = 0
        self._done = 0
        self._closed = False
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self.inference_s = 0.0
        self.wait_s = 0.0

    def put(self, frames: Frames, timeout: float | None = None) -> None:
        """Queue frames for the model; blocks while the queue is full (back-pressure)."""
        if len(frames) == 0:
            return
        self._submitted += len(frames)
        started = time.perf_counter()
        self._batcher.submit(("frames", self, frames), timeout)
        self.wait_s += time.perf_counter() - started

    def finish(self, timeout: float | None = None) -> Features:
        """All features of this stream, in frame order, once the model has seen every frame."""
        self._batcher.submit(("close", self, None), timeout)
        if not self._finished.wait(timeout):
            raise InferenceError("inference did not finish in time")
        if self._error is not None:
            raise InferenceError(f"inference failed: {self._error}") from self._error
        if not self._parts:
            return np.empty((0, self._batcher.model.feature_dim), np.float32)
        return np.concatenate(self._parts)

    # Called on the batcher thread only.
    def _deliver(self, features: Features, seconds: float) -> None:
        self._parts.append(features)
        self._done += len(features)
        self.inference_s += seconds
        self._maybe_finish()

    def _close(self) -> None:
        self._closed = True
        self._maybe_finish()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._finished.set()

    def _maybe_finish(self) -> None:
        if self._closed and self._done >= self._submitted:
            self._finished.set()

    @property
    def waiting(self) -> bool:
        return self._closed and not self._finished.is_set()


_Message = tuple[str, FeatureStream | None, Frames | None]


class InferenceBatcher:
    """One thread that runs the model on fixed-size batches mixing frames of many videos.

    Producers (one per item in flight) ``put`` chunks of frames into a bounded queue and
    block when it is full, so memory stays flat however long the videos or deep the queue.
    The thread packs frames into a batch of exactly ``batch_size`` and runs it when full; a
    partial batch (padded, so the compiled shape never changes) runs only when a finished
    video is waiting on it and no more frames arrive within ``linger_s``.
    """

    def __init__(
        self,
        model: LoadedModel | Future[LoadedModel],
        batch_size: int,
        *,
        input_size: tuple[int, int] | None = None,
        queue_chunks: int = 8,
        linger_s: float = 0.05,
        max_wait_s: float = 2.0,
    ) -> None:
        """``model``: the model, or its future (then ``input_size``, (height, width), is
        needed): frames are taken at once and the first batch waits for the model, so items
        decode while it is still being built; a model that fails fails every batch."""
        if isinstance(model, LoadedModel):
            input_size = (model.input_height, model.input_width)
            ready: Future[LoadedModel] = Future()
            ready.set_result(model)
            model = ready
        if input_size is None:
            raise ValueError("a model still being built needs its input_size")
        self._model = model
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Message] = queue.Queue(maxsize=queue_chunks)
        self._buffer = np.zeros((batch_size, *input_size, 3), dtype=np.uint8)
        self._owners: list[tuple[FeatureStream, int]] = []
        self._filled = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.padded_frames = 0
        self.busy_s = 0.0

    @property
    def model(self) -> LoadedModel:
        """The model (waited for while it is still being built; its error if it failed)."""
        return self._model.result()

    def start(self) -> InferenceBatcher:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
                self._thread.start()
        return self

    def open_stream(self) -> FeatureStream:
        self.start()
        return FeatureStream(self)

    def submit(self, message: _Message, timeout: float | None = None) -> None:
        try:
            self._queue.put(message, timeout=timeout)
        except queue.Full as error:
            raise InferenceError("the inference queue stayed full past the timeout") from error

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(("stop", None, None), timeout=timeout)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            timeout = self.linger_s if self._has_waiting_owner() else self.max_wait_s
            try:
                kind, stream, frames = self._queue.get(timeout=timeout if self._filled else None)
            except queue.Empty:
                self._run_batch()  # nothing more is coming soon: run what we have
                continue
            if kind == "stop":
                if self._filled:
                    self._run_batch()
                return
            assert stream is not None
            if kind == "close":
                stream._close()
                continue
            assert frames is not None
            self._add(stream, frames)

    def _has_waiting_owner(self) -> bool:
        return any(stream.waiting for stream, _ in self._owners)

    def _add(self, stream: FeatureStream, frames: Frames) -> None:
        if frames.shape[1:3] != self._buffer.shape[1:3]:
            stream._fail(ValueError(f"frames {frames.shape[1:3]} != {self._buffer.shape[1:3]}"))
            return
        offset = 0
        while offset < len(frames):
            room = self.batch_size - self._filled
            take = min(room, len(frames) - offset)
            self._buffer[self._filled : self._filled + take] = frames[offset : offset + take]
            self._filled += take
            self._owners.append((stream, take))
            offset += take
            if self._filled == self.batch_size:
                self._run_batch()

    def _run_batch(self) -> None:
        if not self._filled:
            return
        owners, filled = self._owners, self._filled
        self._owners, self._filled = [], 0
        started = time.perf_counter()
        try:
            # Always the full buffer: rows past ``filled`` are stale padding whose outputs
            # are dropped, and the model sees one shape only.
            features = self._model.result().predict(self._buffer)
        except Exception as error:  # handed to every stream in the batch (a failed build too)
            log.exception("inference failed on a batch of %d frames", filled)
            for stream, _ in owners:
                stream._fail(error)
            return
        seconds = time.perf_counter() - started
        self.busy_s += seconds
        self.batches += 1
        self.padded_frames += self.batch_size - filled
        offset = 0
        for stream, count in owners:
            stream._deliver(features[offset : offset + count], seconds * count / filled)
            offset += count
