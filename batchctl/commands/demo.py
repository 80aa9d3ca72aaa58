"""`batchctl demo`: encode a few sample videos, write a manifest, and run it locally."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from batchctl.commands import run as run_command
from batchctl.commands.options import add_run_option_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run the main job locally on sample videos")
    parser.add_argument(
        "--dir", type=Path, default=Path("demo-data"), help="where samples go (default demo-data)"
    )
    parser.add_argument(
        "--manifest", type=Path, help="run this manifest instead of the generated samples"
    )
    parser.add_argument("--nodes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=Path("batchctl-output"))
    parser.add_argument("--json", action="store_true")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from batchctl.local.samples import write_demo_manifest

    manifest = args.manifest or write_demo_manifest(args.dir)
    print(f"demo: running {manifest} on {args.nodes} local worker processes")
    run_args = argparse.Namespace(**{**vars(args), "manifest": manifest, "run_id": None})
    return run_command.handle(run_args)
