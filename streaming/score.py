"""The streaming scorer: every transaction on Kafka scored with the HTTP scorer's own code.

`python -m streaming.score` (or `python -m bytewax.run streaming.score:get_flow`) reads
`transactions`, scores each source micro-batch with one online lookup per feature view through
`scoring.scorer.Scorer` (imported, not over HTTP), writes every prediction to `predictions`
and an alert to `fraud-alerts` when the decision is not approve.

Delivery: at-least-once.  Without recovery the flow starts at the end of the topic (new
transactions only); with `STREAMING_RECOVERY_DIR` it resumes from its snapshot and may
re-emit predictions for events after it; consumers dedupe by `transaction_id`.  Invalid events
are not scored here; the feature dataflow routes them to the DLQ.  Features are those the
feature dataflow had written when the event is scored (its freshness bounds the gap).
"""

from __future__ import annotations

import gc
import json
import logging
from datetime import timedelta
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink
from bytewax.run import cli_main
from threadpoolctl import threadpool_limits

from scoring.config import get_settings as scoring_settings
from scoring.loader import load_scorer
from scoring.prediction_log import prediction_record
from scoring.topics import FRAUD_ALERTS, PREDICTIONS, TRANSACTIONS
from streaming import metrics
from streaming.config import get_settings
from streaming.events import Envelope
from streaming.flow import parse_item

log = logging.getLogger(__name__)


class BatchScorer:
    """Scores micro-batches; the Scorer is loaded once per worker, on first use."""

    def __init__(self, scorer: Any = None) -> None:
        self._scorer: Any = scorer  # a scoring.scorer.Scorer; loaded from settings if None

    def __call__(self, batch: list[Any]) -> list[tuple[str, dict[str, Any]]]:
        if self._scorer is None:

            threadpool_limits(1)
            self._scorer = load_scorer(scoring_settings())
        envs = [e for e in (parse_item(x) for x in batch) if isinstance(e, Envelope)]
        if not envs:
            return []
        events = [e.event for e in envs]
        results = self._scorer.score(events)
        out = []
        for r, ev in zip(results, events, strict=True):
            metrics.PREDICTIONS.labels(r.decision).inc()
            out.append((ev.user_id, prediction_record(r, ev)))
        return out


def _to_messages(item: tuple[str, dict[str, Any]], alerts_topic: str, predictions_topic: str
                 ) -> list[KafkaSinkMessage[bytes, bytes]]:
    key, rec = item
    value = json.dumps(rec).encode()
    msgs = [KafkaSinkMessage(key.encode(), value, topic=predictions_topic)]
    if rec["decision"] != "approve":
        msgs.append(KafkaSinkMessage(key.encode(), value, topic=alerts_topic))
    return msgs


def build_flow(source: Source[Any], sink: Sink[Any], alerts_topic: str = "fraud-alerts",
               predictions_topic: str = "predictions", scorer: Any = None) -> Dataflow:
    """Transactions from `source` -> prediction/alert KafkaSinkMessages into `sink`."""
    flow = Dataflow("stream_scorer")
    raw = op.input("in", flow, source)
    scored = op.flat_map_batch("score", raw, scorer or BatchScorer())
    msgs = op.flat_map("route", scored,
                       lambda item: _to_messages(item, alerts_topic, predictions_topic))
    op.output("out", msgs, sink)
    return flow


def get_flow() -> Dataflow:

    s = get_settings()
    source = KafkaSource([s.bootstrap_servers], [TRANSACTIONS], tail=s.tail,
                         starting_offset=-1, batch_size=s.source_batch_size)  # -1: end of topic
    sink = KafkaSink([s.bootstrap_servers], topic=None,
                     add_config={"acks": "all", "linger.ms": "5"})
    return build_flow(source, sink, FRAUD_ALERTS, PREDICTIONS)


def main() -> None:

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = get_settings()
    metrics.start_metrics_server(s.metrics_host, s.score_metrics_port)
    flow = get_flow()
    gc.freeze()
    log.info("streaming scorer: %s transactions -> predictions, fraud-alerts", s.bootstrap_servers)
    cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=s.snapshot_interval_s))


if __name__ == "__main__":
    main()
