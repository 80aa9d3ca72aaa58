"""``python -m worker``: the node's entry point (``python -m node_image.worker`` from a checkout).

Without options it consumes the run's input queue until the queue stays empty (exit 0) or a
SIGTERM stops it (exit 143). Everything comes from ``BATCHCTL_*`` environment variables
(:class:`batchctl.settings.WorkerSettings`): the storage locations, ``BATCHCTL_RUN_ID``, and
optionally the job's node spec (``BATCHCTL_TASK_OPTIONS``), the weights directory and limits.
With ``BATCHCTL_PROCESSES_PER_NODE`` > 1 it starts one worker process per GPU and waits.

``--standby`` (local mode: ``batchctl.compute.local.StandbyWorkers``) does the slow part of a
start first (imports; for the built-in task, TensorFlow and the model of the node spec in
``BATCHCTL_TASK_OPTIONS``, built and warmed), then reads one JSON object of environment
variables from stdin (the storage, the run, the node name, the final node spec) and runs as
above; an empty stdin (its controller gone or done without it) ends it with 0.

``--check`` verifies the environment without touching storage (ffmpeg, ffprobe, Keras, the
model and which weights it would use) and prints a JSON report. ``--bake-weights`` is for
image builds: it downloads ImageNet weights into the weights directory.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import ValidationError

from batchctl.errors import classify
from batchctl.logs import bound, configure_logging
from batchctl.settings import WorkerSettings

if TYPE_CHECKING:
    from batchctl.contracts import NodeSpec

DEFAULT_WEIGHTS_DIR_ENV = "BATCHCTL_WEIGHTS_DIR"
# The run's task cannot start on this node (batchctl.refusals): reported, no message taken.
EXIT_WORK_REFUSED = 3
log = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description=(
            "Node worker: consume a run's input queue (ffmpeg frame sampling + batched Keras "
            "features), record every item in the ledger, exit when the queue stays empty. "
            "Configured by BATCHCTL_* environment variables (see batchctl.settings)."
        ),
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--check",
        action="store_true",
        help="check ffmpeg, ffprobe, Keras and the model (no storage needed); print JSON",
    )
    action.add_argument(
        "--standby",
        action="store_true",
        help="prepare (imports, model), then read the rest of the environment as one JSON "
        "object on stdin and run",
    )
    action.add_argument(
        "--bake-weights",
        nargs="+",
        metavar="MODEL",
        help="image build: save ImageNet weights of these keras.applications models",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        help=f"where baked weights live (default ${DEFAULT_WEIGHTS_DIR_ENV})",
    )
    parser.add_argument("--log-level", default=None, help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Before settings are read, so that a settings error is logged like everything else.
    log_format = os.environ.get("BATCHCTL_LOG_FORMAT", "text")
    configure_logging(
        args.log_level or os.environ.get("BATCHCTL_LOG_LEVEL") or "INFO",
        "json" if log_format == "json" else "text",
    )
    weights_dir = args.weights_dir or _env_path(DEFAULT_WEIGHTS_DIR_ENV)
    if args.bake_weights:
        from .model import bake_weights

        if weights_dir is None:
            print(
                f"--bake-weights needs --weights-dir or ${DEFAULT_WEIGHTS_DIR_ENV}", file=sys.stderr
            )
            return 2
        for path in bake_weights(args.bake_weights, weights_dir):
            print(f"baked {path}")
        return 0
    if args.check:
        return check(weights_dir)
    if args.standby:
        return standby(sys.stdin.buffer)
    return run()


def standby(assignments: BinaryIO) -> int:
    """Prepare what needs no storage, wait for the assignment on ``assignments``, then run."""
    started = time.perf_counter()
    # Every log line names the run (the controller starts a standby worker for one run).
    with bound(run_id=os.environ.get("BATCHCTL_RUN_ID") or None):
        # The imports and the model on a thread: an assignment that comes first starts the
        # run at once, and its first items download and decode while the model is built.
        # The preparation is announced before the thread starts, so the features task waits
        # for this model however soon the assignment comes, and never builds a second one.
        spec, arguments = standby_plan(os.environ.get("BATCHCTL_TASK_OPTIONS"))
        context = contextvars.copy_context()
        preparing = threading.Thread(
            target=context.run,
            args=(preload, spec, arguments, started),
            name="standby-preload",
            daemon=True,
        )
        preparing.start()
        log.info("standby: waiting for an assignment")
        line = assignments.readline()
        if not line.strip():
            log.info("standby: no assignment; exiting")
            return 0
    try:
        env = json.loads(line)
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("not an object of strings")
    except ValueError as error:
        print(f"standby: the assignment is not a JSON object of strings: {error}", file=sys.stderr)
        return 2
    os.environ.update(env)
    return run()


def standby_plan(raw_spec: str | None) -> tuple[NodeSpec | None, dict[str, Any] | None]:
    """The node spec a standby worker prepares for and, for the built-in task's own models,
    the arguments of the model it builds: announced now (see :func:`preload`). Best effort:
    a spec that does not parse prepares nothing (the run reports it)."""
    from batchctl.contracts import NodeSpec

    try:
        spec = NodeSpec.model_validate_json(raw_spec) if raw_spec else None
        arguments = _prepared_arguments(spec)
    except Exception as error:
        log.warning("standby: nothing prepared: %s: %s", type(error).__name__, error)
        return None, None
    if spec is not None and arguments is not None:
        from .model import expect_preparation

        expect_preparation(spec.model, **arguments)
    return spec, arguments


def preload(
    spec: NodeSpec | None, arguments: dict[str, Any] | None, started: float | None = None
) -> None:
    """Import the worker, and for the built-in task build and warm the model of
    :func:`standby_plan` (kept by :func:`model.load_model`'s cache for the task's own setup).
    Best effort: whatever fails here is done, and reported, again by the run itself; the
    announced preparation ends either way, so nothing waits for it for ever."""
    try:
        from . import loop  # noqa: F401 - the import is the work
        from .model import import_keras, prepare_model

        if spec is not None and arguments is not None:
            prepare_model(spec.model, batch_size=spec.inference_batch_size, **arguments)
        elif spec is not None and spec.task == "features":
            # The run reads the published copy of the user's file (batchctl.artifacts),
            # named only by its assignment: the import is what can be done now.
            import_keras()
    except Exception as error:  # the run builds it again and says what is wrong
        log.warning("standby: could not prepare the model: %s: %s", type(error).__name__, error)
    finally:
        if spec is not None and arguments is not None:
            from .model import end_preparation

            end_preparation(spec.model, **arguments)
    if started is not None:
        log.info("standby: prepared in %.2f s", time.perf_counter() - started)


def _prepared_arguments(spec: NodeSpec | None) -> dict[str, Any] | None:
    """The arguments a standby worker prepares the built-in task's model with, or None when
    it prepares none (another task, or a model from a file of the user's)."""
    if spec is None or spec.task != "features":
        return None
    from .model import parse_model_spec

    model = parse_model_spec(spec.model)
    if model.kind == "file" or model.weights_path:
        return None
    return {
        "frame_size": (spec.frame_size.height, spec.frame_size.width),
        "weights_dir": os.environ.get(DEFAULT_WEIGHTS_DIR_ENV) or None,
        "mixed_precision": _env_flag("BATCHCTL_MIXED_PRECISION"),
    }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def check(weights_dir: Path | None) -> int:
    """Everything a node needs except storage: tools, backend, model and its weights."""
    from batchctl.contracts import NodeSpec, RunOptions

    from . import probeserver
    from .media import tool_versions
    from .model import load_model

    report: dict[str, Any] = {"ok": False}
    try:
        report["tools"] = tool_versions()
        # The probe process (probeserver.py): where PyAV is installed, it must start; without
        # PyAV, ffprobe answers every probe.
        report["probe"] = (
            probeserver.process_versions()
            if probeserver.available()
            else "absent: PyAV is not installed, ffprobe answers every probe"
        )
        raw = os.environ.get("BATCHCTL_TASK_OPTIONS")
        options = NodeSpec.model_validate_json(raw) if raw else RunOptions().node_spec()
        report["task"] = options.task
        if options.task == "features":
            started = time.perf_counter()
            model = load_model(
                options.model,
                frame_size=(options.frame_size.height, options.frame_size.width),
                weights_dir=weights_dir,
            )
            report["model"] = model.describe()
            report["pretrained"] = model.pretrained
            report["model_load_s"] = round(time.perf_counter() - started, 2)
        else:
            from .tasks import task_class

            report["task_class"] = task_class(options.task).__qualname__
        report["ok"] = True
    except Exception as error:  # the report says what failed, in one place
        report["error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def pin_launcher_rank(environ: dict[str, str]) -> dict[str, str]:
    """The variables to set when a launcher started this process as one of several per node.

    Azure ML's distribution (``process_count_per_instance``) starts one copy of the command
    per GPU and tells each its ``LOCAL_RANK``; nothing else pins a copy to its GPU, so without
    this every copy would load its model onto GPU 0. An explicit ``CUDA_VISIBLE_DEVICES``
    (set by an operator or by :func:`supervise`) wins.
    """
    rank = environ.get("LOCAL_RANK", "")
    if not rank.isdigit() or "CUDA_VISIBLE_DEVICES" in environ:
        return {}
    node_name = environ.get("BATCHCTL_NODE_NAME") or environ.get("HOSTNAME") or "node"
    return {"CUDA_VISIBLE_DEVICES": rank, "BATCHCTL_NODE_NAME": f"{node_name}-p{rank}"}


def run() -> int:
    """Consume the run's queue (or supervise one worker per GPU)."""
    from batchctl.settings import get_worker_settings

    # Before settings are read and before Keras is imported (it picks its GPUs at import).
    os.environ.update(pin_launcher_rank(dict(os.environ)))

    try:
        settings = get_worker_settings()
    except ValidationError as error:
        # Name every missing or bad variable, then stop: nothing can work without them.
        problems = "; ".join(
            f"BATCHCTL_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in error.errors()
        )
        print(f"worker settings are incomplete: {problems}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.processes_per_node and settings.processes_per_node > 1:
        return supervise(
            settings.processes_per_node,
            settings.node_name,
            source_cache_bytes=settings.source_cache_bytes,
        )
    from .loop import build_worker

    worker, close = build_worker(settings)
    if settings.controller_pid is not None:
        from .controller_watch import watch_controller

        watch_controller(settings.controller_pid, lambda: worker.stop_now("controller gone"))
    try:
        with worker.signals(), bound(run_id=settings.run_id):
            if settings.task_options:
                # Load the model (and the run's own code) before the first message. A task
                # that cannot start for good is reported once and no message is taken: the
                # run stops with the reason instead of failing every item the same way.
                prepared = worker.prepare()
                if (
                    isinstance(prepared, BaseException)
                    and classify(prepared).permanent
                    and refuse_work(settings, prepared)
                ):
                    return EXIT_WORK_REFUSED
            return worker.run()
    finally:
        close()


def refuse_work(settings: WorkerSettings, error: BaseException) -> bool:
    """Report that this node cannot set the run's task up (batchctl.refusals); False when
    the report could not be written (then the items say it, one by one)."""
    from batchctl.refusals import report_refusal
    from batchctl.storage import BlobStore

    info = classify(error)
    log.error("the run's task cannot start here: %s: %s", info.error_class, info.message)
    store = BlobStore(settings)
    try:
        report_refusal(
            store,
            settings.outputs_container,
            settings.run_id,
            node=settings.node_name,
            error_class=info.error_class,
            reason=info.message,
        )
    except Exception as report_error:
        log.error("could not report the refusal: %s", report_error)
        return False
    finally:
        store.close()
    return True


def supervise(processes: int, node_name: str, *, source_cache_bytes: int = 0) -> int:
    """One worker process per GPU (like ParallelRunStep's process_count_per_node).

    Each child sees one GPU (``CUDA_VISIBLE_DEVICES``) and runs this same module with one
    process; SIGTERM is passed on so every child releases its own in-flight messages. The
    node's source cache budget is the node's: each child gets its share of it.
    """
    module = (__spec__.parent if __spec__ is not None else None) or "worker"
    children: list[subprocess.Popen[bytes]] = []
    for index in range(processes):
        env = dict(os.environ)
        env.update(
            {
                "BATCHCTL_PROCESSES_PER_NODE": "1",
                "BATCHCTL_NODE_NAME": f"{node_name}-p{index}",
                "BATCHCTL_SOURCE_CACHE_BYTES": str(source_cache_bytes // processes),
                "CUDA_VISIBLE_DEVICES": str(index),
            }
        )
        children.append(subprocess.Popen([sys.executable, "-m", module], env=env))

    def forward(number: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(number)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0) if any(codes) else 0


def exit_now(code: int) -> None:
    """End the process with ``code`` once the logs and output are flushed, skipping the
    interpreter's teardown: with TensorFlow loaded that teardown took 1 to 9 s (more under
    load) after the work was done and recorded, and a run's teardown waits for its workers
    to exit. Everything the worker opened is closed by then (``run``'s ``finally``)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
