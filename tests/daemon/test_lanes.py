"""Small batches from live ranks are never held up behind bulk batches."""

from __future__ import annotations

import threading
import time

import grpc

from monitor import wire
from monitor.daemon.ingest import BULK_RECORDS
from monitor.records import Record
from tests.helpers import http_json


def batch(run: str, seq: int, n: int) -> bytes:
    t = time.time()
    return wire.encode_batch(run, 0, "inc", seq, [Record("train", run, t + i, 0, i, {"loss": 1.0}) for i in range(n)])


def test_small_batch_passes_while_the_bulk_lane_is_busy(daemon) -> None:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        call = ch.unary_unary(wire.REPORT_METHOD)
        done = threading.Event()

        def send_bulk() -> None:
            call(batch("bulk", 1, BULK_RECORDS), timeout=30)
            done.set()

        with daemon.ingest.bulk:  # as if a big batch were being applied right now
            th = threading.Thread(target=send_bulk)
            th.start()
            t0 = time.monotonic()
            resp = wire.decode_response(call(batch("live", 1, 10), timeout=10))
            small_s = time.monotonic() - t0
            assert resp.accepted == 10
            assert http_json(daemon.http_url + "/api/v1/runs/live")["last_step"] == 9
            assert small_s < 2.0
            time.sleep(0.3)
            assert not done.is_set()  # the big one waits for its lane
        th.join(30)
        assert done.is_set()
        assert http_json(daemon.http_url + "/api/v1/runs/bulk")["records"] == BULK_RECORDS
