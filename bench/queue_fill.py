"""Fill a run's input queue on Azurite the naive way and the project's way, side by side.

    python -m bench.queue_fill --items 20000 [--naive-items 3000] [--json]

Naive: one synchronous ``send_message`` after another (a round trip per message).
Ours:  :func:`batchctl.storage.queues.enqueue_many_async` (bounded async concurrency on one
       connection pool, backoff on throttling).
Both send the same kind of message (a real WorkItem) to separate queues of one fresh Azurite.
The naive way sends fewer items by default, since its rate is steady after a few hundred and
a full 20,000 would only make the run longer, not the figure better.
"""

from __future__ import annotations

import argparse
import json
import time

from batchctl.contracts import ManifestItem, WorkItem
from batchctl.local.azurite import azurite
from batchctl.storage import RunQueues


def work_messages(run_id: str, count: int) -> list[str]:
    return [
        WorkItem(
            run_id=run_id,
            items=[
                ManifestItem(
                    item_id=f"video-{index:06d}",
                    source=f"https://acct.blob.core.windows.net/media/videos/{index:06d}.mp4",
                    row=index + 2,
                    metadata={"label": "bench"},
                )
            ],
        ).model_dump_json()
        for index in range(count)
    ]


def naive_fill(queues: RunQueues, messages: list[str]) -> float:
    client = queues.client("input")
    started = time.perf_counter()
    for message in messages:
        client.send_message(message)
    return len(messages) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000, help="messages for the fast way")
    parser.add_argument("--naive-items", type=int, default=3_000, help="messages, naive way")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    with azurite() as instance:
        settings = instance.storage_settings()
        naive_queues = RunQueues(settings, "bench-naive")
        fast_queues = RunQueues(settings, "bench-fast")
        naive_queues.create()
        fast_queues.create()

        naive_rate = naive_fill(naive_queues, work_messages("bench-naive", args.naive_items))
        fast_messages = work_messages("bench-fast", args.items)
        stats = fast_queues.enqueue_many(fast_messages, concurrency=args.concurrency)
        fast_rate = stats.sent / stats.seconds
        stored = fast_queues.approximate_count()
        if stored != args.items:
            raise SystemExit(f"lost messages: sent {args.items}, queue holds {stored}")

    result = {
        "naive_msgs_per_s": round(naive_rate, 1),
        "fast_msgs_per_s": round(fast_rate, 1),
        "ratio": round(fast_rate / naive_rate, 2),
        "items": args.items,
        "naive_items": args.naive_items,
        "retries": stats.retries,
    }
    if not args.json:
        print(f"naive: {naive_rate:,.0f} msg/s   fast: {fast_rate:,.0f} msg/s   ", end="")
        print(f"ratio {fast_rate / naive_rate:.2f}x   ({stats.retries} retries)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
