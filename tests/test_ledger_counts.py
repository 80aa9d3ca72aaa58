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
from batchctl.storage.ledger import (
    MAX_SHARDS,
    NODES_PER_SHARD,
    SHARDS,
    existence_filters,
    shard_of,
    shards_for_fleet,
)

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

    ledger = Ledger(StorageSettings.model_validate_json(sys.argv[1]))
    run_id = sys.argv[2]
    for index in range(100_000):
        ledger.record(ItemResult(run_id=run_id, item_id=f"item-{index}",
                                 status=ItemStatus.SUCCEEDED))
        print(index, flush=True)
    """
)


def kill_while_writing(
    script: str, storage: StorageSettings, run_id: str, repo_root: Path, wanted: int, delay_s: float
) -> None:
    """Run a writer ``script`` (given the settings as JSON and the run id; it prints a line
    after each write) and SIGKILL it ``delay_s`` after its ``wanted``-th line."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, storage.model_dump_json(), run_id],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for _ in range(wanted):
        process.stdout.readline()
    time.sleep(delay_s)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_writer_killed_at_a_random_moment_leaves_exact_counters(
    storage_settings: StorageSettings, run_id: str, repo_root: Path, seed: int
) -> None:
    # SIGKILL while it records: whatever request was in flight either happened whole or
    # not at all, so the counters still equal the records.
    wanted = random.Random(seed).randint(5, 40)
    delay_s = random.Random(seed).uniform(0, 0.05)
    kill_while_writing(WRITER, storage_settings, run_id, repo_root, wanted, delay_s)
    ledger = Ledger(storage_settings)
    counted = ledger.counted_rows(run_id)
    assert counted.succeeded >= wanted
    assert ledger.counts(run_id) == counted


def test_the_shard_count_grows_with_the_fleet() -> None:
    assert shards_for_fleet(1) == SHARDS
    assert shards_for_fleet(SHARDS * NODES_PER_SHARD) == SHARDS
    assert shards_for_fleet(SHARDS * NODES_PER_SHARD + 1) == 2 * SHARDS
    assert shards_for_fleet(1000) == 128
    assert shards_for_fleet(10**6) == MAX_SHARDS
    counts = [shards_for_fleet(nodes) for nodes in range(1, 5000, 7)]
    assert counts == sorted(counts)  # more nodes never fewer shards


def test_a_run_keeps_the_shard_count_it_fixed_first(
    storage_settings: StorageSettings, run_id: str
) -> None:
    ledger = Ledger(storage_settings)
    assert ledger.shard_count(run_id) == SHARDS  # nothing fixed: the default
    assert ledger.fix_shard_count(run_id, 64) == 64
    assert ledger.fix_shard_count(run_id, 32) == 64  # a retried start keeps the first
    other = Ledger(storage_settings)  # another process reads it from the ledger
    assert other.shard_count(run_id) == 64
    assert list(other.shards(run_id)) == list(range(64))
    with pytest.raises(ValueError, match="1 to 256 shards, not 0"):
        ledger.fix_shard_count(run_id, 0)


def test_records_spread_over_the_runs_own_shards(
    storage_settings: StorageSettings, run_id: str
) -> None:
    ledger = Ledger(storage_settings)
    ledger.fix_shard_count(run_id, 64)
    items = [f"item-{index}" for index in range(400)]
    assert ledger.record_absent(result(run_id, item) for item in items) == 400
    used = {shard for shard in ledger.shards(run_id) if ledger.recorded_ids(run_id, shard)}
    assert len(used) > SHARDS  # beyond the default's 16 partitions
    assert ledger.recorded_ids(run_id) == set(items)
    assert ledger.counts(run_id) == ledger.counted_rows(run_id)
    assert ledger.counts(run_id).succeeded == 400
    assert ledger.get(run_id, "item-7") is not None and ledger.has_record(run_id, "item-7")


def test_a_message_is_recorded_with_one_transaction_per_shard(ledger: Ledger, run_id: str) -> None:
    # A message's items from one shard (as the controller packs them): one counter read
    # and one transaction, whatever the number of items.
    ids = [item for item in (f"m-{i}" for i in range(400)) if shard_of(item) == 3][:8]
    ledger.fix_shard_count(run_id, SHARDS)  # as a run's start does (else one read more)
    before = ledger.requests
    written = ledger.record_many(result(run_id, item) for item in ids)
    assert written == {(run_id, item) for item in ids}
    assert ledger.requests - before == 2
    before = ledger.requests
    assert ledger.recorded_among(run_id, [*ids, "m-none"]) == set(ids)
    assert ledger.requests - before == 1 + (shard_of("m-none") != 3)
    # Delivered again, with one new item among them: only that one is written.
    again = [*ids, "m-new"]
    assert ledger.record_many(result(run_id, item, ItemStatus.FAILED) for item in again) == {
        (run_id, "m-new")
    }
    counts = ledger.counts(run_id)
    assert (counts.succeeded, counts.failed) == (8, 1)
    assert counts == ledger.counted_rows(run_id)


def test_racing_message_writers_keep_the_counters_exact(
    storage_settings: StorageSettings, run_id: str
) -> None:
    # 6 writers record overlapping messages of 8 items (seeded): every item is delivered
    # about 3 times, across shards, so transactions fail on taken items and on the
    # counters' ETags alike; the first record of each item wins, once.
    items = [f"item-{i}" for i in range(160)]
    rng = random.Random(11)
    shares = [[rng.sample(items, 8) for _ in range(10)] for _ in range(6)]
    wins: list[set[tuple[str, str]]] = []

    def writer(messages: list[list[str]]) -> None:
        ledger = Ledger(storage_settings)
        for message in messages:
            wins.append(ledger.record_many(result(run_id, item) for item in message))
        ledger.close()

    threads = [threading.Thread(target=writer, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    delivered = {item for share in shares for message in share for item in message}
    won = [item for batch in wins for (_, item) in batch]
    assert sorted(won) == sorted(delivered)  # each delivered item won exactly once
    ledger = Ledger(storage_settings)
    assert ledger.counts(run_id) == ledger.counted_rows(run_id)
    assert ledger.counts(run_id).succeeded == len(delivered)


BATCH_WRITER = textwrap.dedent(
    """
    import sys
    from batchctl.contracts import ItemResult, ItemStatus
    from batchctl.settings import StorageSettings
    from batchctl.storage import Ledger

    ledger = Ledger(StorageSettings.model_validate_json(sys.argv[1]))
    run_id = sys.argv[2]
    ledger.fix_shard_count(run_id, 32)
    for start in range(0, 100_000, 8):
        ledger.record_many(ItemResult(run_id=run_id, item_id=f"item-{index}",
                                      status=ItemStatus.SUCCEEDED)
                           for index in range(start, start + 8))
        print(start, flush=True)
    """
)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_message_writer_killed_at_a_random_moment_leaves_exact_counters(
    storage_settings: StorageSettings, run_id: str, repo_root: Path, seed: int
) -> None:
    # As above, with messages of 8 items over 32 shards: several transactions per message,
    # so the kill may fall between two of them; each happened whole or not at all.
    rng = random.Random(seed)
    wanted = rng.randint(3, 20)
    kill_while_writing(
        BATCH_WRITER, storage_settings, run_id, repo_root, wanted, rng.uniform(0, 0.05)
    )
    ledger = Ledger(storage_settings)
    assert ledger.shard_count(run_id) == 32
    counted = ledger.counted_rows(run_id)
    assert counted.succeeded >= wanted * 8
    assert ledger.counts(run_id) == counted


def test_lookups_keep_within_azures_fifteen_comparisons_a_filter(
    ledger: Ledger, run_id: str
) -> None:
    # Azurite takes any filter; Azure refuses one of more than 15 comparisons.
    ids = [f"x-{index:03d}" for index in range(40)]
    filters = existence_filters("p", reversed(ids))
    assert len(filters) == 4
    for text in filters:
        assert sum(text.count(op) for op in (" eq ", " ge ", " le ", " ne ")) <= 15
    ledger.fix_shard_count(run_id, 1)  # every id in one partition
    assert ledger.record_absent(result(run_id, item) for item in ids[::3]) == 14
    before = ledger.requests
    assert ledger.recorded_among(run_id, ids) == set(ids[::3])
    assert ledger.requests - before == 4


def test_a_poll_reads_the_shards_counters_side_by_side_and_sums_them_exactly(
    ledger: Ledger, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 shards (a 512-node fleet), records of every status spread over them: the counters are
    # read side by side (a slow storage's round trips overlap) and their sum is the full scan's.
    ledger.fix_shard_count(run_id, shards_for_fleet(512))
    rng = random.Random(11)
    statuses = [ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.NOT_RUN, ItemStatus.SKIPPED]
    ledger.record_many(
        result(run_id, f"item-{index}", rng.choice(statuses)) for index in range(300)
    )
    fetch = ledger._fetch_counter
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def slow_fetch(key: str) -> tuple[dict[str, int], str | None]:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.02)  # a round trip to a distant account
            return fetch(key)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(ledger, "_fetch_counter", slow_fetch)
    before = ledger.requests
    counts = ledger.counts(run_id)
    assert ledger.requests - before == 64  # one read per shard, each counted once
    assert most[0] > 1, "the counters were read one after another"
    assert counts == ledger.counted_rows(run_id)
    assert counts.succeeded + counts.failed + counts.not_run + counts.skipped == 300
