"""The package ``batchctl task new NAME`` writes: a task of one's own, ready to run.

One source for two readers. The scaffold writes these files, ``mywork`` replaced by NAME;
docs/own-work.md shows the same files verbatim as its worked example (each in a fenced block
whose info string names it: ``python title=mywork/mywork/task.py``), and
tests/test_task_scaffold.py holds the guide's blocks equal to :data:`FILES` and runs the
written package end to end (a local run, real videos, a real model), whole and in segments.
So the example the guide shows is the code the scaffold writes, and both are known to run.

The layout: ``NAME/`` is the code folder a run names with ``--code NAME`` (what travels,
its ``requirements.txt`` and ``.batchctlignore`` at its root, where the packer and the node
look for them), and ``NAME/NAME/`` the Python package in it, imported as
``--task NAME.task:MyTask`` (the code folder goes first on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import keyword
import shutil
import sys
from pathlib import Path

# The name the templates are written with; rendering replaces it with the package's name.
PLACEHOLDER = "mywork"
TASK_CLASS = "MyTask"
# Names a task package must not take: the node's worker package (imported as ``worker``)
# and this library. A package of the code folder comes first on ``sys.path`` on the nodes.
RESERVED_NAMES = ("worker", "batchctl", "node_image")
# The commands that try the written package (the README lists them; the guide shows them).
TRY_COMMANDS = (
    "python mywork/make_model.py tiny.keras",
    "batchctl trial manifest.csv --rows 5 --code mywork --task mywork.task:MyTask "
    "--model tiny.keras",
    "batchctl run manifest.csv --code mywork --task mywork.task:MyTask --model tiny.keras",
)
AZURE_COMMAND = (
    "batchctl submit manifest.csv --code mywork --task mywork.task:MyTask --model tiny.keras"
)
README_FILE = "mywork/README.md"


def _file(text: str) -> str:
    """A template as written below: its literal starts on a line of its own (so each of
    its lines reads as in the file), which is not part of the file."""
    return text.removeprefix("\n")


# Path (relative to the folder the package is written in) -> text, for the name PLACEHOLDER.
FILES: dict[str, str] = {
    "mywork/mywork/__init__.py": _file(
        r'''
"""mywork: a batchctl task of your own (the task is mywork.task:MyTask)."""
'''
    ),
    "mywork/mywork/task.py": _file(
        r'''
"""mywork.task: sample frames, score them with your own Keras model, summarize each video.

Run it with ``--code mywork --task mywork.task:MyTask --model FILE.keras`` (README.md beside
this package has the commands; docs/own-work.md in batchctl is the guide). Per video:

1. the node's own decoder samples frames at ``--fps``, resized to ``--frame-size`` (the
   same ffmpeg pipeline, limits and timestamps as the built-in tasks);
2. your model turns every frame into a vector (``scores``), a helper measures its brightness;
3. the item's outputs: ``scores.npz`` (``scores`` float32 (frames, outputs), ``brightness``
   float32 (frames,), ``timestamps`` float64 seconds from the video's start) and
   ``summary.json``; the worker adds ``metadata.json`` (this task's metadata and what ran).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

# The node's own worker package (importable as ``worker`` on every node and in local runs):
# its decoder and its error classes, the ones the built-in tasks use.
from worker.errors import TaskConfigError, UndecodableError
from worker.media import SampleWindow, sample_video
from worker.taskapi import AssemblyContext, ItemInput, ItemOutput, SegmentPart, TaskSetup

from . import helpers

SCORES_FILE = "scores.npz"
SUMMARY_FILE = "summary.json"
# Frames per model call at most: memory stays bounded however long the video.
MAX_BATCH = 64


class MyTask:
    """Scores every sampled frame of a video with the run's own ``.keras`` model.

    The worker creates one instance per process, calls ``setup`` once, ``process`` for each
    item (a video, or one segment of a long one) and ``close`` at exit.
    """

    # ``process`` may run on several threads at once (one per item in flight), so decoding
    # overlaps; the model itself is called under a lock of its own.
    thread_safe: ClassVar[bool] = True
    # With --segment-seconds S a video longer than S is split: ``process`` then gets one
    # segment (``item.item.segment``) and ``assemble`` joins the segments' outputs.
    supports_segments: ClassVar[bool] = True

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()
        self._setup: TaskSetup | None = None
        self._batch = 1
        self._outputs = 0

    def setup(self, setup: TaskSetup) -> None:
        """Load the model once per process, check it fits the run, warm it up.

        A TaskConfigError here fails every item for good with its message (no retry can fix
        a wrong model), and the run's error budget then stops the run early.
        """
        options = setup.options
        # On a node this is the checked local copy of the file given to --model.
        if not options.model.endswith(".keras"):
            raise TaskConfigError(
                f"mywork needs a model saved as .keras (--model FILE.keras), not {options.model!r}"
            )
        # Imported here, not at the top: batchctl imports this module to check it before a
        # run starts, and importing Keras takes seconds.
        import keras

        try:
            model = keras.saving.load_model(options.model, compile=False)
        except Exception as error:  # a file that does not load never will
            raise TaskConfigError(
                f"{options.model} does not load as a Keras model: {error}"
            ) from None
        frame = (options.frame_size.height, options.frame_size.width)
        fixed = helpers.input_size(getattr(model, "input_shape", None))
        if fixed is not None and fixed != frame:
            raise TaskConfigError(
                f"the model takes {fixed[1]}x{fixed[0]} frames, the run decodes "
                f"{frame[1]}x{frame[0]}: run it with --frame-size {fixed[1]}x{fixed[0]}"
            )
        self._batch = min(options.inference_batch_size, MAX_BATCH)
        # One call now: the first item does not pay for tracing, and it says the output width.
        blank = helpers.fixed_batch(np.zeros((0, *frame, 3), np.uint8), self._batch)
        self._outputs = int(np.prod(np.shape(model.predict_on_batch(blank))[1:]))
        self._model = model
        self._setup = setup

    def process(self, item: ItemInput) -> ItemOutput:
        """One video, or one segment of it: sample, score, summarize."""
        setup = self._setup
        if setup is None:
            raise RuntimeError("MyTask.process called before setup")
        options = item.options
        segment = item.item.segment
        # A segment samples its own range only, with the whole video's timestamps: the
        # segments' rows, joined in order, are exactly the whole video's.
        window = None if segment is None else SampleWindow(segment.start_s, segment.end_s)
        info, plan, reader = sample_video(
            item.path,
            fps=options.fps,
            width=options.frame_size.width,
            height=options.frame_size.height,
            # The node's limits (size, duration, resolution, decode time): a video over one
            # fails for good with its reason (TooLongError, TooLargeError...).
            limits=setup.limits,
            exact_timestamps=options.exact_timestamps,
            chunk_frames=self._batch,
            threads=setup.decode_threads,
            window=window,
        )
        chunks: list[helpers.Scores] = []
        inference_s = 0.0
        with reader:
            # The item's timeout, or the worker stopping, kills the decoder at once.
            item.cancel.add_callback(reader.cancel)
            try:
                for chunk in reader:
                    item.cancel.raise_if_cancelled()
                    started = time.perf_counter()
                    scores = self._score(chunk.frames)
                    inference_s += time.perf_counter() - started
                    light = helpers.brightness(chunk.frames)
                    chunks.append(helpers.Scores(scores, light, chunk.timestamps))
            except Exception:
                # A decoder killed by the token fails as the token says (a timeout is
                # retried, a stopping worker gives the item back), not as a broken video.
                item.cancel.raise_if_cancelled()
                raise
        rows = helpers.join(chunks, self._outputs)
        if segment is None and len(rows.timestamps) == 0:
            raise UndecodableError("no frame could be decoded")  # permanent: fails at once
        metadata: dict[str, Any] = {
            # The probe's facts; its duration_s and the frames below are what `batchctl
            # trial` measures node-seconds per second of video on.
            **info.describe(),
            "frames": len(rows.timestamps),
            "sampling": {"fps": options.fps, "path": plan.path, "reason": plan.reason},
            "model": Path(options.model).name,
            "outputs_per_frame": self._outputs,
        }
        if segment is not None:
            metadata["segment"] = segment.model_dump(mode="json")
        return self._output(rows, metadata, decode_s=reader.stats.seconds, inference_s=inference_s)

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        """The item's output from its segments' (all of them, in order): what ``process``
        gives for the whole video. ``context`` offers a scratch folder and the source, for
        work whose parts must be re-encoded; rows only need joining."""
        rows = helpers.join(
            [helpers.from_npz(part.read(SCORES_FILE)) for part in parts], self._outputs
        )
        if len(rows.timestamps) == 0:
            raise UndecodableError("no frame could be decoded in any segment")
        # Every segment probed the whole video: the first one's metadata is the item's.
        metadata = dict(parts[0].result.metadata)
        metadata.pop("segment", None)
        metadata.update(frames=len(rows.timestamps), segments=len(parts))
        return self._output(
            rows,
            metadata,
            decode_s=sum(part.result.timings.decode_s for part in parts),
            inference_s=sum(part.result.timings.inference_s for part in parts),
        )

    def close(self) -> None:
        """At exit: let the model go."""
        self._model = None

    def _score(self, frames: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """The model's output for each frame, flattened to one row per frame."""
        rows = []
        for start in range(0, len(frames), self._batch):
            part = frames[start : start + self._batch]
            batch = helpers.fixed_batch(part, self._batch)
            with self._lock:
                out = np.asarray(self._model.predict_on_batch(batch), np.float32)
            rows.append(out.reshape(len(batch), -1)[: len(part)])
        return np.concatenate(rows) if rows else np.empty((0, self._outputs), np.float32)

    def _output(
        self, rows: helpers.Scores, metadata: dict[str, Any], *, decode_s: float, inference_s: float
    ) -> ItemOutput:
        summary = json.dumps(helpers.summarize(rows), indent=2) + "\n"
        return ItemOutput(
            # Names are relative to the item's own folder (letters, digits, '._-', up to 4
            # levels; metadata.json is the worker's).
            files={SCORES_FILE: helpers.to_npz(rows), SUMMARY_FILE: summary.encode()},
            metadata=metadata,
            decode_s=decode_s,
            inference_s=inference_s,
            content_types={
                SUMMARY_FILE: "application/json",
                SCORES_FILE: "application/octet-stream",
            },
        )
'''
    ),
    "mywork/mywork/helpers.py": _file(
        r'''
"""mywork's helpers: plain numpy, nothing of the worker or of Keras (test them on their own).

A code package may hold as many modules as it likes: the whole folder travels, and on every
node it comes first on ``sys.path``, so ``task.py`` imports this module as on your machine.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

# ITU-R BT.601 luma weights: how bright a pixel looks, from its R, G and B.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class Scores(NamedTuple):
    """One row per sampled frame: the model's outputs, the frame's brightness and its time."""

    scores: npt.NDArray[np.float32]  # (frames, outputs)
    brightness: npt.NDArray[np.float32]  # (frames,), 0 (black) to 1 (white)
    timestamps: npt.NDArray[np.float64]  # (frames,), seconds from the video's start


def brightness(frames: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The mean luma of each frame of a (frames, height, width, 3) RGB batch, 0 to 1."""
    luma = frames.astype(np.float32) @ LUMA
    return np.asarray(luma.mean(axis=(1, 2)) / 255.0, np.float32)


def fixed_batch(frames: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """``frames`` as float32, padded with black frames to exactly ``size`` of them.

    Every model call then sees one shape: the model is traced once, not once per length.
    """
    if len(frames) > size:
        raise ValueError(f"{len(frames)} frames do not fit a batch of {size}")
    batch = np.zeros((size, *frames.shape[1:]), np.float32)
    batch[: len(frames)] = frames
    return batch


def input_size(shape: Any) -> tuple[int, int] | None:
    """(height, width) a model's input shape fixes, like (None, 64, 64, 3); None when it
    fixes none (a model taking any size, or several inputs)."""
    if not isinstance(shape, tuple) or len(shape) != 4:
        return None
    height, width = shape[1], shape[2]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def join(parts: Sequence[Scores], outputs: int) -> Scores:
    """Several runs of rows as one (the chunks of a video, or the segments of an item)."""
    if not parts:
        return Scores(
            np.empty((0, outputs), np.float32), np.empty(0, np.float32), np.empty(0, np.float64)
        )
    return Scores(
        np.concatenate([part.scores for part in parts]).astype(np.float32),
        np.concatenate([part.brightness for part in parts]).astype(np.float32),
        np.concatenate([part.timestamps for part in parts]).astype(np.float64),
    )


def to_npz(rows: Scores) -> bytes:
    """The rows as one .npz file (``numpy.load`` reads it back)."""
    buffer = io.BytesIO()
    np.savez(buffer, **rows._asdict())
    return buffer.getvalue()


def from_npz(data: bytes) -> Scores:
    with np.load(io.BytesIO(data)) as saved:
        return Scores(
            np.asarray(saved["scores"], np.float32),
            np.asarray(saved["brightness"], np.float32),
            np.asarray(saved["timestamps"], np.float64),
        )


def summarize(rows: Scores) -> dict[str, Any]:
    """What a person reads first: how many frames, how bright, and where the first output
    peaks (None where the video gave no frame)."""
    if len(rows.timestamps) == 0:
        return {"frames": 0, "mean_brightness": None, "peak": None}
    best = int(np.argmax(rows.scores[:, 0])) if rows.scores.shape[1] else 0
    return {
        "frames": len(rows.timestamps),
        "mean_brightness": round(float(rows.brightness.mean()), 6),
        "peak": {
            "time_s": round(float(rows.timestamps[best]), 6),
            "score": round(float(rows.scores[best, 0]), 6) if rows.scores.shape[1] else None,
        },
    }
'''
    ),
    "mywork/make_model.py": _file(
        r'''
"""Writes a small untrained Keras model standing in for yours.

    python mywork/make_model.py tiny.keras [--size 224]

Your own model is any Keras model saved as ``.keras`` that takes float32 RGB frames with
values 0 to 255, shaped (batch, height, width, 3), and gives each frame an output. Its input
size is the run's ``--frame-size`` (224, batchctl's default, here). It travels with
``--model`` (uploaded by its content), not in the code folder: .batchctlignore keeps this
script and .keras files here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def build_model(size: int) -> Any:
    """A tiny CNN: size x size RGB frames in, 4 numbers per frame out."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4)(x)
    return keras.Model(inputs, outputs, name="mywork_tiny")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="where to write the model (a .keras file)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args(argv)
    build_model(args.size).save(args.path)
    print(f"wrote {args.path}: frames of {args.size}x{args.size} in (--frame-size {args.size})")


if __name__ == "__main__":
    main()
'''
    ),
    "mywork/requirements.txt": _file(
        r"""
# Packages mywork needs that the node image lacks, one a line, pinned (name==version).
# Installed on every node before the first item (once per package content, within 10
# minutes), first on sys.path; their dependencies are installed too, even those the image
# has: pin versions that work with the image's (node_image/requirements.txt in batchctl).
"""
    ),
    "mywork/.batchctlignore": _file(
        r"""
# What stays on this machine when this folder travels (--code); a .gitignore here counts
# too, and .git/, __pycache__/, *.pyc, .venv/, venv/ and .mypy_cache/ never travel.
# The model travels on its own (--model), the videos through the manifest.
make_model.py
*.keras
*.h5
*.mp4
*.csv
batchctl-output/
"""
    ),
}


def _readme() -> str:
    commands = "\n".join(TRY_COMMANDS)
    return f"""# mywork

A task of your own for batchctl, written by `batchctl task new mywork`: `mywork/task.py`
(the task, `mywork.task:{TASK_CLASS}`) and `mywork/helpers.py` (its numpy helpers). This
folder is the code package: `--code mywork` packs it (less what `.batchctlignore` lists),
uploads it by content and puts it first on `sys.path` on every node, where its
`requirements.txt` is installed first. The guide: docs/own-work.md in batchctl.

Try it from the folder that holds `mywork/` and a manifest (`manifest.csv`: a `video` column
naming videos under its folder), with batchctl's Python environment active:

```sh
{commands}
```

Each item gets `scores.npz`, `summary.json` and the worker's `metadata.json`. Then on Azure
(`--image REF` runs it on an image with your packages):

```sh
{AZURE_COMMAND}
```
"""


FILES[README_FILE] = _readme()


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a task package, or None when it can."""
    if not name.isidentifier() or keyword.iskeyword(name):
        return (
            f"{name!r} is not a valid Python identifier (letters, digits and underscores, not "
            "starting with a digit, no keyword): the package is imported by this name, as "
            f"--task NAME.task:{TASK_CLASS}"
        )
    # On a node the code folder comes first on sys.path: a package named like a module the
    # worker needs would hide it (or be hidden by it, if already imported).
    if name in RESERVED_NAMES:
        taken = "batchctl's own"
    elif name in sys.stdlib_module_names:
        taken = "a Python standard module's"
    # A module installed here is most likely in the node image too.
    elif _installed(name):
        taken = "an installed module's"
    else:
        return None
    return (
        f"{name!r} is {taken} name, and your package comes first on sys.path on the nodes: "
        "choose another NAME"
    )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module loaded without a spec: it exists
        return True


def task_reference(name: str) -> str:
    """The ``--task`` value of the package ``name``."""
    return f"{name}.task:{TASK_CLASS}"


def render(name: str) -> dict[str, str]:
    """The package's files for ``name``: path (relative to the folder it is written in) to
    text. ValueError when the name cannot name a package."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return {
        path.replace(PLACEHOLDER, name): text.replace(PLACEHOLDER, name)
        for path, text in FILES.items()
    }


def write_package(name: str, directory: Path) -> Path:
    """Write the package ``name`` into ``directory`` (``directory/name/``); its folder.

    FileExistsError when ``directory/name`` exists: nothing is ever written into or over
    what is there. A write that fails halfway removes the folder it created."""
    files = render(name)
    target = directory / name
    target.mkdir()  # atomic: whoever finds it there already gets FileExistsError
    try:
        for relative, text in sorted(files.items()):
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
