"""`batchctl demo`: encode a few sample videos, write a manifest, and run it locally."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from batchctl.commands import run as run_command
from batchctl.commands.options import add_run_option_arguments
from batchctl.commands.run import add_nodes_argument
from batchctl.commands.validate import manifest_argument, path_argument


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the main job locally on sample videos", description=__doc__
    )
    parser.add_argument(
        "--dir", type=path_argument, default=Path("demo-data"), help="where samples go"
    )
    parser.add_argument(
        "--manifest",
        type=manifest_argument,
        help="run this manifest instead of the generated samples (default: the samples)",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("batchctl-output"),
        help="where the report and outputs are copied, under RUN_ID/",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from batchctl.local.samples import write_demo_manifest

    manifest = args.manifest or write_demo_manifest(args.dir)
    # stderr: with --json, stdout carries only the final JSON line.
    print(f"demo: running {manifest} on {args.nodes} local worker processes", file=sys.stderr)
    run_args = argparse.Namespace(**{**vars(args), "manifest": manifest, "run_id": None})
    return run_command.handle(run_args)
