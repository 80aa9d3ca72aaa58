"""A node's bookkeeping costs a few storage requests per item, counted at the transport.

The small case of bench/bookkeeping.py: a real local run (``batchctl run``, worker
processes, Azurite) of 300 near-no-op items of a custom task, mini-batches of 8, the
workers' requests counted by a hook around azure-core's transport. Beyond the item's
outputs, a node's requests (ledger, queue, outputs index) must
average at most 3 per item; every item has exactly one record.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bookkeeping import REPO, figures, one_run, write_inputs

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

ITEMS = 300


def test_a_node_sends_at_most_three_bookkeeping_requests_per_item(tmp_path: Path) -> None:
    manifest, code = write_inputs(tmp_path / "inputs", ITEMS)
    run = one_run(REPO, manifest, code, tmp_path / "run", nodes=2, mini_batch=8)
    summary = run["summary"]
    assert (summary["succeeded"], summary["failed"]) == (ITEMS, 0), summary
    assert run["workers"] == 2  # both workers' counts came back
    result = figures(run, ITEMS)
    kinds = result["requests_per_item_by_kind"]
    # The hook sees what the run did: two outputs (the task's file and metadata.json) per
    # item and one index entry per success; no download (a local worker reads the local
    # videos in place).
    assert "download" not in kinds and kinds["outputs"] == 2.0 and kinds["index"] == 1.0
    assert result["bookkeeping_requests_per_item"] <= 3.0, result
    # The ledger itself: a lookup, a counter read and a transaction per message (8 items,
    # one or two shards), not three requests per item.
    assert kinds["table"] <= 1.0, result
