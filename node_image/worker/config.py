"""The worker's knobs: from :class:`~batchctl.settings.WorkerSettings`, or built by tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from batchctl.contracts import NodeSpec, RunOptions
from batchctl.settings import WorkerSettings

from .sourcecache import DEFAULT_BUDGET_BYTES
from .taskapi import MediaLimits


@dataclass(frozen=True)
class WorkerConfig:
    """The loop's knobs (from WorkerSettings; tests build it directly)."""

    run_id: str
    node_name: str = "node"
    concurrency: int = 3
    prefetch: int = 1
    shutdown_grace_s: float = 20.0
    poll_interval_s: float = 1.0
    retry_delay_s: float = 5.0
    limits: MediaLimits = field(default_factory=MediaLimits)
    weights_dir: str | None = None
    mixed_precision: bool = False
    decode_threads: int = 1
    work_dir: Path | None = None
    # Disk for long videos' sources kept for their segments (0: no cache).
    source_cache_bytes: int = DEFAULT_BUDGET_BYTES
    # Whether successes are noted in the outputs index (WorkerSettings.index_outputs).
    index_outputs: bool = True
    # The job's node spec (task, timeouts, attempts, idle exit, items per message), fixed
    # for the life of the process: it arrives once, with the job, never with a message.
    spec: NodeSpec = field(default_factory=lambda: RunOptions().node_spec())

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WorkerConfig:
        spec = (
            NodeSpec.model_validate_json(settings.task_options)
            if settings.task_options
            else RunOptions().node_spec()
        )
        return cls(
            run_id=settings.run_id,
            node_name=f"{settings.node_name}:{os.getpid()}",
            concurrency=settings.concurrency,
            prefetch=settings.prefetch,
            shutdown_grace_s=settings.shutdown_grace_s,
            poll_interval_s=settings.poll_interval_s,
            retry_delay_s=settings.retry_delay_s,
            limits=MediaLimits(
                max_bytes=settings.max_video_bytes,
                max_duration_s=settings.max_duration_s,
                max_width=settings.max_width,
                max_height=settings.max_height,
                max_pixels=settings.max_pixels,
                decode_timeout_s=settings.decode_timeout_s,
            ),
            weights_dir=settings.weights_dir,
            mixed_precision=settings.mixed_precision,
            decode_threads=settings.decode_threads,
            work_dir=Path(settings.work_dir) if settings.work_dir else None,
            source_cache_bytes=settings.source_cache_bytes,
            index_outputs=settings.index_outputs,
            spec=spec,
        )
