"""The Kafka input's lost-log check believes an end offset below its position only once the
log no longer serves the last record it read.

Tansu answers a partition's end (ListOffsets latest, the high watermark) as the first offset
of its last record batch + 1: after one batch of 40 records it says 1.  Taken at its word, the
check "reset" every partition whose last batch held more than one record to the earliest
offset, on resume and then every `check_every_s` while idle: the whole partition replayed
again and again (harmless duplicates, wasted work, and a restart that never resumed).
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from devenv.broker import TansuBroker
from scoring.kafka_conf import consumer_conf
from scoring.topics import TRANSACTIONS
from streaming.kafka_input import KafkaInput
from streaming.producer import TransactionProducer

RECORDS = 40


def _resets(part_no: int) -> float:
    return float(REGISTRY.get_sample_value("fraud_stream_offset_resets_total",
                                           {"partition": str(part_no)}) or 0.0)


def test_an_end_offset_below_a_record_still_served_is_not_a_lost_log(
    kafka_broker: TansuBroker,
) -> None:
    bootstrap = kafka_broker.bootstrap
    key = f"k-{uuid.uuid4().hex[:8]}"
    with TransactionProducer(bootstrap) as producer:  # one key, one flush: one record batch
        for i in range(RECORDS):
            producer.send_raw(key, f"r{i}".encode())
    probe = Consumer(consumer_conf(bootstrap, key))
    ends = {p: probe.get_watermark_offsets(TopicPartition(TRANSACTIONS, p), 5, cached=False)[1]
            for p in range(4)}
    probe.close()
    (part_no,) = [p for p, end in ends.items() if end > 0]
    before = _resets(part_no)
    source = KafkaInput(bootstrap, TRANSACTIONS, batch_size=100, check_every_s=0.2)
    part = source.build_part("in", f"{part_no}-{TRANSACTIONS}", RECORDS)  # resume at the end
    try:
        assert part.snapshot() == RECORDS
        got = []
        deadline = time.monotonic() + 3.0  # ~15 running checks
        while time.monotonic() < deadline:
            got.extend(part.next_batch())
            time.sleep(0.05)
        assert got == [] and part.snapshot() == RECORDS
        assert _resets(part_no) == before
    finally:
        part.close()
    print(f"the broker reported the end of partition {part_no} as {ends[part_no]} "
          f"after {RECORDS} records")
