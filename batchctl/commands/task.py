"""`batchctl task new NAME [--dir DIR]`: start a task of your own from a working one.

Writes ``DIR/NAME/``, a code folder ready to run (docs/own-work.md is the guide):

    NAME/
      NAME/task.py       the task, NAME.task:MyTask: samples frames with the node's own
                         decoder, scores them with your .keras model, summarizes each video
      NAME/helpers.py    its numpy helpers (a code package may hold any modules)
      make_model.py      writes a tiny untrained .keras model to try it with
      requirements.txt   packages the nodes install first (none yet)
      .batchctlignore    what stays here when the folder travels
      README.md          the commands to try it

then prints those commands. An existing ``DIR/NAME`` is never touched (exit 3), nor is a
NAME taken that is no Python identifier or that would hide a module on the nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from batchctl import scaffold
from batchctl.commands.validate import BadInputError, existing_dir_argument

EXIT_OK = 0


def name_argument(text: str) -> str:
    """A task package's name (see :func:`batchctl.scaffold.name_problem`)."""
    problem = scaffold.name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "task",
        help="your own work: start a task package that runs as it is",
        description=__doc__,
    )
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="new: write a task package"
    )
    new = actions.add_parser(
        "new",
        help="write DIR/NAME/, a task package ready to run (never over an existing one)",
        description=__doc__,
    )
    new.add_argument(
        "name",
        type=name_argument,
        metavar="NAME",
        help="the package's name, a Python identifier: the folder and --task NAME.task:MyTask",
    )
    new.add_argument(
        "--dir",
        type=existing_dir_argument,
        default=Path("."),
        help="the existing folder to write NAME/ in",
    )
    new.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    new.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    name: str = args.name
    directory: Path = args.dir
    try:
        folder = scaffold.write_package(name, directory)
    except FileExistsError:
        raise BadInputError(
            f"{directory / name} exists already: batchctl task new writes a new folder and "
            "never touches one that is there (choose another NAME or --dir)"
        ) from None
    shown = _shown(folder)
    files = sorted(scaffold.render(name))
    commands = [command.replace(scaffold.PLACEHOLDER, name) for command in scaffold.TRY_COMMANDS]
    where = "here" if folder.parent.resolve() == Path.cwd() else f"in {_shown(folder.parent)}"
    print(f"wrote {shown}/: task {scaffold.task_reference(name)}", file=sys.stderr)
    print(f"try it {where} (the commands are in {shown}/README.md):", file=sys.stderr)
    for command in commands:
        print(f"  {command}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "created": str(folder.resolve()),
                    "task": scaffold.task_reference(name),
                    "files": files,
                    "try": commands,
                    "exit_code": EXIT_OK,
                }
            )
        )
    return EXIT_OK


def _shown(path: Path) -> str:
    """``path`` as a person would type it from here: relative when it is below the current
    folder, absolute otherwise."""
    resolved = path.resolve()
    try:
        return os.path.relpath(resolved) if resolved.is_relative_to(Path.cwd()) else str(resolved)
    except ValueError:  # another drive (Windows)
        return str(resolved)
