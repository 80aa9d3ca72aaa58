"""A node's bookkeeping per item, today's batched path beside the per-item one, in one run.

    python -m bench.bookkeeping [--items 20000] [--nodes 2] [--mini-batch 8]
                                [--baseline-ref REF | --no-baseline] [--json]

Each side is a real local run (``batchctl run`` in a subprocess, on a fresh Azurite of its
own) of ``--items`` near-no-op items of a custom task (:data:`NOOP_TASK`: one tiny output
file per item, no model, no decoding), so what is left of a node's cost is its bookkeeping.
The worker processes are counted at the transport: a ``sitecustomize`` module put on their
``PYTHONPATH`` wraps azure-core's ``RequestsTransport.send`` and, at the exit of each process
that became a node (it has ``BATCHCTL_NODE_NAME`` by then; at ``atexit`` or ``os._exit``),
writes how many requests it sent
by kind and the CPU seconds it used. Kinds:

- ``download``: reads of the item's source (the media container; none for the local videos
  this benchmark's manifest names, which a local worker reads in place);
- ``outputs``: writes of the item's outputs (``RUN/items/ITEM/...``);
- bookkeeping, everything else: the ledger (table), the queue (receive, renew, delete,
  count), the outputs index entries (``_index/``), the code package at start.

Printed for each side: storage requests per item beyond download and outputs
(``bookkeeping_requests_per_item``, goal <= 3 for the batched path), by kind, and worker CPU
milliseconds per item (``worker_cpu_ms_per_item``: from each worker's first queue request
to its exit, so its imports and task set-up are left out; ``..._with_start``: all of it);
then the ratios. The per-item side runs the code of
``--baseline-ref`` (the last commit before the bookkeeping was batched, extracted with
``git archive`` into a temporary folder); the same Azurite, CLI flags, task and counting
hook serve both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from batchctl.local.azurite import azurite
from bench.common import write_tiny_manifest

REPO = Path(__file__).resolve().parent.parent
# The last commit whose node recorded item by item (a counter read and a transaction per
# item, "already recorded?" per item, messages packed in manifest order).
PER_ITEM_REF = "7686be26e8479d2d3f70c78d0a564bad4cdf4a1f"
NOOP_TASK = "bench_noop:NoopTask"

TASK_SOURCE = textwrap.dedent(
    '''
    """A near-no-op task: one small output per item, nothing decoded."""

    from typing import Any, ClassVar


    class NoopTask:
        thread_safe: ClassVar[bool] = True

        def setup(self, setup: Any) -> None:
            pass

        def process(self, item: Any) -> Any:
            from worker.taskapi import ItemOutput

            return ItemOutput(
                files={"out.txt": item.item.item_id.encode()},
                metadata={"frames": 0, "duration_s": 0.0},
            )

        def close(self) -> None:
            pass
    '''
)

# Put first on a worker's path: counts what azure-core sends, by kind, and the worker's CPU.
HOOK_SOURCE = textwrap.dedent(
    """
    import atexit, collections, json, os, time
    from urllib.parse import urlsplit

    _DIR = os.environ.get("BENCH_COUNT_DIR")
    _OUTPUTS = os.environ.get("BENCH_OUTPUTS_CONTAINER", "outputs")
    _MEDIA = os.environ.get("BENCH_MEDIA_CONTAINER", "media")
    _counts = collections.Counter()
    _cpu = {}


    def _cpu_now():
        usage = os.times()
        return usage.user + usage.system


    def _kind(method, url):
        parts = urlsplit(url)
        path = parts.path.lstrip("/").split("/")
        port = parts.port
        if str(port) == os.environ.get("BENCH_TABLE_PORT"):
            return "table"
        if str(port) == os.environ.get("BENCH_QUEUE_PORT"):
            return "queue"
        # Azurite's blob paths begin with the account name.
        container = path[1] if len(path) > 1 else ""
        rest = "/".join(path[2:])
        if container == _MEDIA and method in ("GET", "HEAD"):
            return "download"
        if container == _OUTPUTS and rest.startswith("_index/"):
            return "index"
        if container == _OUTPUTS and "/items/" in rest and method == "PUT":
            return "outputs"
        return "other_blob"


    def _install():
        from azure.core.pipeline.transport import RequestsTransport

        send = RequestsTransport.send

        def counted(self, request, **kwargs):
            kind = _kind(request.method, request.url)
            if kind == "queue" and "start" not in _cpu:
                _cpu["start"] = _cpu_now()  # the first receive: imports and set-up done
            _counts[kind] += 1
            return send(self, request, **kwargs)

        RequestsTransport.send = counted


    def _dump():
        total = _cpu_now()
        data = {
            "counts": dict(_counts),
            "cpu_s": total,
            "cpu_after_start_s": total - _cpu.get("start", 0.0),
        }
        with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as handle:
            json.dump(data, handle)


    def _dump_if_node():
        # A worker learns its node name at start or, started ahead on standby, from its
        # stdin later: only processes that became nodes are counted (not the controller).
        if os.environ.get("BATCHCTL_NODE_NAME") and not _cpu.get("dumped"):
            _cpu["dumped"] = 1.0
            _dump()


    _real_exit = os._exit


    def _exit(code):
        # A worker may end with os._exit (skipping the interpreter's teardown): count it too.
        _dump_if_node()
        _real_exit(code)


    if _DIR:
        _install()
        atexit.register(_dump_if_node)
        os._exit = _exit
    """
)


def write_inputs(folder: Path, items: int) -> tuple[Path, Path]:
    """A manifest of ``items`` rows (one tiny source each), the task's code folder."""
    manifest = write_tiny_manifest(folder, items)
    code = folder / "code"
    code.mkdir()
    (code / "bench_noop.py").write_text(TASK_SOURCE)
    return manifest, code


def extract(ref: str, target: Path) -> Path:
    """The tree of ``ref`` (git archive), with this checkout's node_modules (Azurite)."""
    target.mkdir(parents=True)
    git, tar = shutil.which("git"), shutil.which("tar")
    if git is None or tar is None:
        raise RuntimeError("the per-item side needs git and tar (or run with --no-baseline)")
    archive = subprocess.run(
        [git, "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run([tar, "-x", "-C", str(target)], input=archive, check=True)
    if (REPO / "node_modules").exists():
        (target / "node_modules").symlink_to((REPO / "node_modules").resolve())
    return target


def one_run(
    tree: Path, manifest: Path, code: Path, work: Path, *, nodes: int, mini_batch: int
) -> dict[str, Any]:
    """A local run of ``tree``'s code on a fresh Azurite; its workers' requests and CPU."""
    counts_dir = work / "counts"
    hook_dir = work / "hook"
    counts_dir.mkdir(parents=True)
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK_SOURCE)
    with azurite(workdir=work / "azurite") as instance:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
        env.update(instance.environment())
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(tree), str(hook_dir)]),
                "BENCH_COUNT_DIR": str(counts_dir),
                "BENCH_TABLE_PORT": str(instance.table_port),
                "BENCH_QUEUE_PORT": str(instance.queue_port),
            }
        )
        command = [
            sys.executable, "-m", "batchctl", "run", str(manifest),
            "--nodes", str(nodes), "--mini-batch", str(mini_batch), "--no-copy",
            "--code", str(code), "--task", NOOP_TASK, "--idle-exit", "1", "--poll", "1",
            "--out", str(work / "out"), "--run-id", "bench-bookkeeping", "--json",
        ]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, check=False
        )
        wall_s = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    counts: dict[str, int] = {}
    cpu_s = working_cpu_s = 0.0
    workers = 0
    for path in counts_dir.glob("*.json"):
        data = json.loads(path.read_text())
        workers += 1
        cpu_s += float(data["cpu_s"])
        working_cpu_s += float(data["cpu_after_start_s"])
        for kind, count in data["counts"].items():
            counts[kind] = counts.get(kind, 0) + int(count)
    return {"summary": summary, "counts": counts, "cpu_s": cpu_s, "workers": workers,
            "working_cpu_s": working_cpu_s, "wall_s": wall_s}  # fmt: skip


def figures(run: dict[str, Any], items: int) -> dict[str, Any]:
    counts: dict[str, int] = run["counts"]
    bookkeeping = sum(n for kind, n in counts.items() if kind not in ("download", "outputs"))
    return {
        "bookkeeping_requests_per_item": round(bookkeeping / items, 3),
        "requests_per_item_by_kind": {
            kind: round(count / items, 3) for kind, count in sorted(counts.items())
        },
        "worker_cpu_ms_per_item": round(1000 * run["working_cpu_s"] / items, 2),
        "worker_cpu_ms_per_item_with_start": round(1000 * run["cpu_s"] / items, 2),
        "workers_counted": run["workers"],
        "run_wall_s": round(run["wall_s"], 1),
    }


def measure(items: int, nodes: int, mini_batch: int, baseline_ref: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-bookkeeping-") as tmp:
        folder = Path(tmp)
        manifest, code = write_inputs(folder / "inputs", items)
        sides: dict[str, Path] = {"batched": REPO}
        if baseline_ref is not None:
            sides["per_item"] = extract(baseline_ref, folder / "per-item-tree")
        result: dict[str, Any] = {"items": items, "nodes": nodes, "mini_batch": mini_batch}
        for name, tree in sides.items():
            run = one_run(tree, manifest, code, folder / name, nodes=nodes, mini_batch=mini_batch)
            result[name] = figures(run, items)
        if "per_item" in result:
            new, old = result["batched"], result["per_item"]
            result["requests_ratio"] = round(
                new["bookkeeping_requests_per_item"] / old["bookkeeping_requests_per_item"], 3
            )
            result["cpu_ratio"] = round(
                new["worker_cpu_ms_per_item"] / old["worker_cpu_ms_per_item"], 3
            )
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--baseline-ref", default=PER_ITEM_REF)
    parser.add_argument("--no-baseline", action="store_true", help="the batched side only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(
        args.items, args.nodes, args.mini_batch, None if args.no_baseline else args.baseline_ref
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
