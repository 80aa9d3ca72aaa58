"""Sample videos for the demo, encoded here with ffmpeg (nothing is downloaded)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

# (file name, ffmpeg test source, seconds, size): a few shapes a real batch would have.
SAMPLES = (
    ("city.mp4", "testsrc2", 6, "320x240"),
    ("harbour.mp4", "smptebars", 4, "480x270"),
    ("forest.mp4", "mandelbrot", 5, "320x240"),
    ("market.mp4", "rgbtestsrc", 3, "256x256"),
    ("station.mp4", "testsrc", 8, "640x360"),
    ("bridge.mp4", "life", 4, "320x240"),
)


def ffmpeg_path() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise RuntimeError("ffmpeg not found: run `make demo` (it installs ffmpeg) or install it")
    return found


def encode_sample(path: Path, source: str, seconds: int, size: str) -> None:
    """A short H.264 clip with a keyframe every second (like a streaming encode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_path(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"{source}=size={size}:rate=25",
            # -t rather than the source's duration option: not every lavfi source has one.
            "-t",
            str(seconds),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-g",
            "25",
            "-movflags",
            "+faststart",
            str(path),
        ],
        check=True,
        timeout=120,
    )


def write_demo_manifest(directory: Path) -> Path:
    """Encode the samples (once) and write a manifest naming them; returns its path."""
    videos = directory / "videos"
    rows = []
    for name, source, seconds, size in SAMPLES:
        target = videos / name
        if not target.exists():
            encode_sample(target, source, seconds, size)
        rows.append({"id": Path(name).stem, "video": f"videos/{name}", "source": source})
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "video", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
