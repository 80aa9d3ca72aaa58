"""The work a node does per item, behind one small interface (no queue in sight).

A task is a class with a no-argument constructor and three methods (see :class:`Task`). The
worker creates it once per process (per distinct set of options that matter to it), calls
``setup`` once, then ``process`` for every item, possibly from several threads at once when
the class says it is ``thread_safe``, and ``close`` at exit. ``features`` is built in; a
custom task is named ``module:Class`` in ``TaskSettings.task`` and must be importable on the
node (baked into the image, or on ``PYTHONPATH``).

A task reads the downloaded file at ``item.path`` and returns the files to store and the
metadata to record. It never touches queues, the ledger or blob storage: the loop persists
what it returns, under the item's own output prefix, and decides retries from the exceptions
it raises (an exception class with ``permanent = True`` fails the item at once; anything else
is retried up to the run's max attempts). A long task should watch ``item.cancel``.

The types a task sees are defined in :mod:`node_image.worker.taskapi`, a module that imports
nothing of the worker (so the worker's own modules import them from there without a cycle);
this package re-exports them, as before, and holds the registry: ``features``, ``transform``
and ``module:Class`` resolved to a class (:func:`task_class`), instantiated and set up
(:func:`create_task`).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import TaskConfigError
from ..taskapi import CancelToken, ItemInput, ItemOutput, MediaLimits, Task, TaskSetup


def task_class(name: str) -> type[Any]:
    """The class named by ``TaskSettings.task``: ``features`` or ``module:Class``."""
    if name == "features":
        from .features import FeaturesTask

        return FeaturesTask
    if name == "transform":
        from .transform import TransformTask

        return TransformTask
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise TaskConfigError(
            f"task {name!r} is neither a built-in task (features, transform) nor 'module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskConfigError(f"task module {module_name!r} cannot be imported: {error}") from error
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise TaskConfigError(f"task {name!r}: {module_name} has no class {class_name}")
    return found


def create_task(setup: TaskSetup) -> Task:
    """Instantiate and set up the run's task (once per process and options)."""
    cls = task_class(setup.options.task)
    instance = cls()
    if not isinstance(instance, Task):
        raise TaskConfigError(f"task {setup.options.task!r} lacks setup, process or close")
    instance.setup(setup)
    return instance


def is_thread_safe(task: Task) -> bool:
    return getattr(task, "thread_safe", False) is True


__all__ = [
    "CancelToken",
    "ItemInput",
    "ItemOutput",
    "MediaLimits",
    "Task",
    "TaskSetup",
    "create_task",
    "is_thread_safe",
    "task_class",
]
