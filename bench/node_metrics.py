"""What node metrics cost a worker's record, side by side in one run (issue 26).

    python -m bench.node_metrics [--records 20000] [--json]

Plain:    a ledger's ``record`` (an in-memory one: what the hook adds, not storage's cost).
Metered:  the same ledger wrapped by ``NodeMetrics.observing`` at the default cadence, its
          batches sent to the real MLflow client against a local HTTP server that answers
          every ``log-batch`` at once.
Prints the microseconds per record of each, their ratio, and how many requests the metered
run sent for how many records (the cadence: never a request per record). Records here come
back to back, thousands a second; on a node they come seconds apart, so the absolute cost
a record (microseconds) is what to weigh against an item's seconds, not the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from batchctl.contracts import ItemResult, ItemStatus, StageTimings
from node_image.worker.metrics import MlflowSink, MlflowTarget, NodeMetrics


class MemoryLedger:
    def __init__(self) -> None:
        self.records: dict[str, ItemResult] = {}
        self._lock = threading.Lock()

    def has_record(self, run_id: str, item_id: str) -> bool:
        return item_id in self.records

    def record(self, result: ItemResult) -> bool:
        with self._lock:
            if result.item_id in self.records:
                return False
            self.records[result.item_id] = result
            return True


def results(count: int) -> list[ItemResult]:
    timings = StageTimings(download_s=0.2, decode_s=0.3, inference_s=0.4, total_s=1.0)
    return [
        ItemResult(
            run_id="bench", item_id=f"v{index}", status=ItemStatus.SUCCEEDED, timings=timings
        )
        for index in range(count)
    ]


def per_record(ledger: Any, batch: list[ItemResult]) -> float:
    started = time.perf_counter()
    for result in batch:
        ledger.record(result)
    return (time.perf_counter() - started) / len(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.setdefault("MLFLOW_TRACKING_TOKEN", "bench")
    target = MlflowTarget(f"http://127.0.0.1:{server.server_address[1]}", "bench-run")
    plain_s = per_record(MemoryLedger(), results(args.records))
    meter = NodeMetrics(MlflowSink(target))
    metered_s = per_record(meter.observing(MemoryLedger()), results(args.records))
    meter.close()
    server.shutdown()
    figures = {
        "records": args.records,
        "plain_us_per_record": round(plain_s * 1e6, 3),
        "metered_us_per_record": round(metered_s * 1e6, 3),
        "ratio": round(metered_s / plain_s, 2),
        "batches": meter.batches,
        "requests": len(requests),
        "dropped": meter.dropped,
        "every_items": meter.every_items,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{args.records} records: plain {figures['plain_us_per_record']} us, metered "
            f"{figures['metered_us_per_record']} us a record (x{figures['ratio']}); "
            f"{figures['batches']} batches in {figures['requests']} requests "
            f"(one per {meter.every_items} records at most; {meter.dropped} dropped: records "
            "here come far faster than a server takes batches)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
