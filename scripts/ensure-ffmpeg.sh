#!/usr/bin/env bash
# Make ffmpeg and ffprobe available. The worker needs both (ffprobe reads duration, fps and
# rotation), and PyPI's bundled builds ship ffmpeg alone, so Debian's package is the source.
set -euo pipefail
if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ffmpeg with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  exit 0
fi
echo "ffmpeg/ffprobe not found and cannot install them (not root or no apt-get):" >&2
echo "install ffmpeg with your package manager and run make again" >&2
exit 1
