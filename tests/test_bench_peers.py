"""bench/peers.py's own checks: the CPU of orphaned processes is counted, and the
rows/timestamps comparison catches every kind of difference."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import peers

# A command that leaves an orphan burning CPU after it exits (as Ray's daemons, or a worker
# whose parent is gone, would): the parent exits at once, the child spins for a while.
ORPHAN_SPIN_S = 0.6
ORPHAN = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    end = time.process_time() + {spin}\n"
    "    while time.process_time() < end:\n"
    "        pass\n"
    "    os._exit(0)\n"
    "os._exit(0)\n"
)


def test_measure_counts_the_cpu_of_an_orphan(tmp_path: Path) -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the benchmark's role, in a child so pytest itself is not a subreaper
        os.close(read)
        peers.become_subreaper()
        command = [sys.executable, "-c", ORPHAN.format(spin=ORPHAN_SPIN_S)]
        started = time.perf_counter()
        # However busy the machine, the orphan ends by itself (not killed after a grace).
        wall, cpu, left = peers.measure(
            command, dict(os.environ), tmp_path / "log", leftover_grace_s=300
        )
        total = time.perf_counter() - started
        os.write(write, f"{wall} {cpu} {left} {total}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        wall_s, cpu_s, left_n, total_s = (float(x) for x in answer.read().split())
    os.waitpid(pid, 0)
    assert left_n == 1, "the orphan outlived its parent and was seen"
    assert cpu_s >= ORPHAN_SPIN_S * 0.9, f"only {cpu_s:.2f} CPU-s counted"
    # The orphan spun at least its CPU time after its parent exited (more on a busy machine):
    # the wall time ends at the command's exit, not at the orphan's.
    assert total_s - wall_s >= ORPHAN_SPIN_S * 0.9, (wall_s, total_s)


def test_compare_names_every_difference() -> None:
    reference = {"a.mp4": np.array([0.0, 1.0]), "b.mp4": np.array([0.0]), "c.mp4": np.array([0.0])}
    other = {
        "a.mp4": np.array([0.0, 1.5]),  # a timestamp differs
        "b.mp4": np.array([0.0, 1.0]),  # a row more
        "d.mp4": np.array([0.0]),  # not in the reference; c.mp4 missing
    }
    problems = peers.compare(reference, other)
    assert [p.split(":")[0] for p in problems] == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert "2 rows, expected 1" in problems[1]
    assert peers.compare(reference, dict(reference)) == []


def test_decode_frames_gives_one_keyframe_a_second(tmp_path: Path) -> None:
    clip = tmp_path / "clip-0000.mp4"
    peers.encode_clip(clip, 0)
    frames, times = peers.decode_frames(clip)
    assert frames.shape == (peers.clip_seconds(0), peers.FRAME, peers.FRAME, 3)
    assert np.allclose(times, np.arange(peers.clip_seconds(0)))


def test_a_bad_manifest_is_refused_with_its_name(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nclip.mp4\n")
    with pytest.raises(ValueError, match=r"m\.csv: the first line must be the header 'video'"):
        peers.read_manifest(manifest)
