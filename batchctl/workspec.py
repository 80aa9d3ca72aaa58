"""What work a run names (its model and its task), checked without importing TensorFlow.

The node worker resolves ``RunOptions.model`` and ``RunOptions.task`` only when it starts
(node_image/worker/model.py and worker/tasks): a name it does not know fails every item of
the run with ``TaskConfigError``, after the fleet was paid for. The command line and the
app's start route check the same rules here first, in the CLI process or the Functions host,
where importing Keras would cost seconds (and the app does not ship it).

``KERAS_APPLICATIONS`` is the list ``worker.model.application_names()`` gives for the Keras
the node image pins; tests/test_cli_edges.py holds the two equal.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

# keras.applications model classes (Keras 3.15, the node image's version): the names a run's
# model may be, built without its classifier by the worker.
KERAS_APPLICATIONS: tuple[str, ...] = (
    "ConvNeXtBase",
    "ConvNeXtLarge",
    "ConvNeXtSmall",
    "ConvNeXtTiny",
    "ConvNeXtXLarge",
    "DenseNet121",
    "DenseNet169",
    "DenseNet201",
    "EfficientNetB0",
    "EfficientNetB1",
    "EfficientNetB2",
    "EfficientNetB3",
    "EfficientNetB4",
    "EfficientNetB5",
    "EfficientNetB6",
    "EfficientNetB7",
    "EfficientNetV2B0",
    "EfficientNetV2B1",
    "EfficientNetV2B2",
    "EfficientNetV2B3",
    "EfficientNetV2L",
    "EfficientNetV2M",
    "EfficientNetV2S",
    "InceptionResNetV2",
    "InceptionV3",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
    "NASNetLarge",
    "NASNetMobile",
    "ResNet101",
    "ResNet101V2",
    "ResNet152",
    "ResNet152V2",
    "ResNet50",
    "ResNet50V2",
    "VGG16",
    "VGG19",
    "Xception",
)

# Tasks built into the worker (node_image/worker/tasks): anything else is 'module:Class'.
# ``transform`` maps frames to frames and needs a .keras model (the worker checks its shape).
BUILTIN_TASKS: tuple[str, ...] = ("features", "transform")

MODEL_FILE_SUFFIX = ".keras"
WEIGHTS_SUFFIX = ".weights.h5"
# The same shape RunOptions accepts for a custom task.
CUSTOM_TASK_PATTERN = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


@dataclass(frozen=True)
class ModelName:
    """A model as the worker reads ``RunOptions.model`` (see ``worker.model.parse_model_spec``).

    ``application``: a keras.applications class (``weights`` a file, or None for the baked or
    random weights); ``file``: a whole model saved as ``.keras`` (``name`` is its path).
    """

    kind: Literal["application", "file"]
    name: str
    weights: str | None = None


def parse_model(text: str) -> ModelName:
    """``Name``, ``Name@path.weights.h5`` or ``path/model.keras``; ValueError with the rule.

    Only the name is checked here, not whether a file exists: where it must exist (the node's
    disk, or this machine's for a local run) is the caller's to say.
    """
    value = text.strip()
    if not value:
        raise ValueError("the model is empty: name a keras.applications model or a .keras file")
    if value.endswith(MODEL_FILE_SUFFIX):
        return ModelName("file", value)
    name, at, weights = value.partition("@")
    if name.endswith(".h5") and not at:
        raise ValueError(
            f"{text!r} is a weights file, not a model: name its model too, as "
            f"Name@{value} (e.g. MobileNetV3Small@{value})"
        )
    if at and not weights:
        raise ValueError(f"{text!r} names no weights file after '@'")
    if name not in KERAS_APPLICATIONS:
        close = difflib.get_close_matches(name, KERAS_APPLICATIONS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. MobileNetV3Small, ResNet50"
        raise ValueError(
            f"unknown model {name!r}: not a keras.applications model ({hint}), "
            f"'Name@FILE{WEIGHTS_SUFFIX}' or a path to a {MODEL_FILE_SUFFIX} file"
        )
    return ModelName("application", name, weights or None)


def parse_task(text: str) -> tuple[str, str] | None:
    """None for a built-in task, else (module, class) of a custom one; ValueError otherwise."""
    value = text.strip()
    if value in BUILTIN_TASKS:
        return None
    if not re.fullmatch(CUSTOM_TASK_PATTERN, value):
        raise ValueError(
            f"task {text!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
            "nor 'module:Class'"
        )
    module, _, cls = value.partition(":")
    return module, cls
