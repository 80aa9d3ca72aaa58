"""The ledger's counters stay exact: duplicates, races, retries, and a writer killed midway.

The poll reads one counter row per shard instead of every record; these tests hold the
counters equal to a full scan of the records (``counted_rows``) on Azurite, under the
faults that make naive counting drift.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from batchctl.contracts import ItemError, ItemResult, ItemStatus
from batchctl.settings import StorageSettings
from batchctl.storage import Ledger
from batchctl.storage.ledger import SHARDS, shard_of

pytestmark = pytest.mark.azurite


def result(run_id: str, item_id: str, status: ItemStatus = ItemStatus.SUCCEEDED) -> ItemResult:
    error = None
    if status is not ItemStatus.SUCCEEDED:
        error = ItemError(error_class="Boom", message="boom", permanent=True, attempts=1)
    return ItemResult(run_id=run_id, item_id=item_id, status=status, error=error)


def test_shards_spread_items_evenly() -> None:
    per_shard = [0] * SHARDS
    for index in range(16_000):
        per_shard[shard_of(f"item-{index}")] += 1
    assert min(per_shard) > 800 and max(per_shard) < 1200


def test_duplicates_never_count_twice(ledger: Ledger, run_id: str) -> None:
    assert ledger.record(result(run_id, "a"))
    assert not ledger.record(result(run_id, "a"))
    assert not ledger.record(result(run_id, "a", ItemStatus.FAILED))  # the first one wins
    assert ledger.counts(run_id) == ledger.counted_rows(run_id)
    assert (ledger.counts(run_id).succeeded, ledger.counts(run_id).failed) == (1, 0)


def test_racing_writers_and_duplicate_deliveries_keep_the_counters_exact(
    storage_settings: StorageSettings, run_id: str
) -> None:
    # 6 writers, each delivering a shuffled, overlapping share of 120 items (every item
    # delivered 3 times on average): seeded, so a failure replays.
    items = [f"item-{i}" for i in range(120)]
    rng = random.Random(7)
    deliveries = [rng.sample(items, 60) for _ in range(6)]
    wins: list[int] = []

    def writer(share: list[str]) -> None:
        ledger = Ledger(storage_settings)
        wins.append(sum(ledger.record(result(run_id, item)) for item in share))
        ledger.close()

    threads = [threading.Thread(target=writer, args=(share,)) for share in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger = Ledger(storage_settings)
    delivered = {item for share in deliveries for item in share}
    assert sum(wins) == len(delivered)  # each item won by exactly one delivery
    assert ledger.counts(run_id).succeeded == len(delivered)
    assert ledger.counts(run_id) == ledger.counted_rows(run_id)
    assert ledger.recorded_ids(run_id) == delivered


def test_a_retried_activity_writes_nothing_twice(ledger: Ledger, run_id: str) -> None:
    ledger.record(result(run_id, "item-3"))
    batch = [result(run_id, f"item-{i}", ItemStatus.NOT_RUN) for i in range(250)]
    assert ledger.record_absent(batch) == 249  # item-3 already had its record
    assert ledger.record_absent(batch) == 0  # the activity ran again: nothing new
    counts = ledger.counts(run_id)
    assert (counts.succeeded, counts.not_run) == (1, 249)
    assert counts == ledger.counted_rows(run_id)


WRITER = textwrap.dedent(
    """
    import sys
    from batchctl.contracts import ItemResult, ItemStatus
    from batchctl.settings import StorageSettings
    from batchctl.storage import Ledger

    ledger = Ledger(StorageSettings(storage_auth="azurite", blob_url=sys.argv[1],
                                    queue_url=sys.argv[2], table_url=sys.argv[3]))
    run_id = sys.argv[4]
    for index in range(100_000):
        ledger.record(ItemResult(run_id=run_id, item_id=f"item-{index}",
                                 status=ItemStatus.SUCCEEDED))
        print(index, flush=True)
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_writer_killed_at_a_random_moment_leaves_exact_counters(
    storage_settings: StorageSettings, run_id: str, repo_root: Path, seed: int
) -> None:
    # SIGKILL while it records: whatever request was in flight either happened whole or
    # not at all, so the counters still equal the records.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            storage_settings.blob_url,
            storage_settings.queue_url,
            storage_settings.table_url,
            run_id,
        ],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    wanted = random.Random(seed).randint(5, 40)
    for _ in range(wanted):
        process.stdout.readline()
    time.sleep(random.Random(seed).uniform(0, 0.05))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    ledger = Ledger(storage_settings)
    counted = ledger.counted_rows(run_id)
    assert counted.succeeded >= wanted
    assert ledger.counts(run_id) == counted
