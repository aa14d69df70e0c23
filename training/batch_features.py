"""Batch feature job: daily user and merchant profiles from the transaction log (DuckDB).

Each snapshot row has `event_timestamp` = a day's 00:00 UTC and uses only data strictly before
it: transactions of the 30 preceding days, and fraud labels whose `label_timestamp` is earlier
than the snapshot.  Snapshots run from the day after a user's (merchant's) first transaction to
the day after the log ends.  Output: `$FRAUD_DATA_DIR/features/{user,merchant}_profile.parquet`.

A user's profile also carries the card holder's home time zone from the customer records
(`$FRAUD_DATA_DIR/customers.parquet`; missing when there are none) and the user's usual time
of day: the circular mean of the UTC hours of their transactions in the window, so the
request-time features can say how far a transaction lies from the user's own rhythm.

This job runs on DuckDB whatever `OFFLINE_ENGINE` says: a Spark port would change the last
bits of the float features (summation order, the JVM's sin/cos), hence the model
(docs/scaling.md, "Offline store and batch jobs").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import duckdb

from feature_repo.config import apply_env_defaults, data_dir
from feature_repo.paths import customers_path, features_dir, labels_path, transactions_dir
from feature_repo.progress import progress, show_summaries

WINDOW_DAYS = 30
# Below this mean resultant length the hours of a window spread evenly round the clock and
# their circular mean is noise: the usual hour is missing instead.
MIN_RESULTANT = 1e-6
_NO_CUSTOMERS = "SELECT NULL::VARCHAR AS user_id, NULL::DOUBLE AS home_utc_offset_hours LIMIT 0"

_PRELUDE = """
SET TimeZone = 'UTC';
CREATE OR REPLACE TEMP VIEW tx AS
  SELECT transaction_id, user_id, merchant_id, amount,
         event_timestamp::TIMESTAMPTZ AS event_timestamp,
         date_trunc('day', event_timestamp::TIMESTAMPTZ) AS day,
         -- time of day as an angle, so hours average around the clock (23:00 and 01:00 -> 00:00)
         (epoch_us(event_timestamp::TIMESTAMPTZ) % 86400000000) * 2 * pi() / 86400000000
           AS hour_angle
  FROM read_parquet('{tx_glob}', hive_partitioning = false);
CREATE OR REPLACE TEMP VIEW labels AS
  SELECT transaction_id, is_fraud, label_timestamp::TIMESTAMPTZ AS label_timestamp
  FROM read_parquet('{labels}');
CREATE OR REPLACE TEMP VIEW customers AS {customers};
CREATE OR REPLACE TEMP TABLE bounds AS
  SELECT max(day) + INTERVAL 1 DAY AS last_snapshot FROM tx;
"""

# Dense (key, day) grid + row windows over the 30 preceding days; distinct merchants via +1/-1
# coverage intervals per (user, merchant) so the whole job stays a handful of linear scans.
_USER_SQL = """
COPY (
WITH daily AS (
  SELECT user_id, day, count(*) AS c, sum(amount) AS s, sum(amount * amount) AS ss,
         sum(sin(hour_angle)) AS hs, sum(cos(hour_angle)) AS hc
  FROM tx GROUP BY ALL
), firsts AS (
  SELECT user_id, min(event_timestamp) AS first_ts, min(day) AS first_day FROM tx GROUP BY ALL
), grid AS (
  SELECT f.user_id, f.first_ts, g.d AS day
  FROM firsts f, bounds b,
       LATERAL unnest(generate_series(f.first_day, b.last_snapshot, INTERVAL 1 DAY)) AS g(d)
), um AS (
  SELECT user_id, merchant_id, day,
         lead(day) OVER (PARTITION BY user_id, merchant_id ORDER BY day) AS next_day
  FROM (SELECT DISTINCT user_id, merchant_id, day FROM tx)
), deltas AS (
  SELECT user_id, day + INTERVAL 1 DAY AS day, 1 AS delta FROM um
  UNION ALL
  SELECT user_id,
         least(day + INTERVAL {w} DAY, coalesce(next_day, day + INTERVAL {w} DAY))
           + INTERVAL 1 DAY,
         -1
  FROM um
), delta_day AS (SELECT user_id, day, sum(delta) AS delta FROM deltas GROUP BY ALL),
rolled AS (
  SELECT g.user_id, g.day, g.first_ts,
         sum(d.c) OVER w AS c, sum(d.s) OVER w AS s, sum(d.ss) OVER w AS ss,
         sum(d.hs) OVER w AS hs, sum(d.hc) OVER w AS hc,
         sum(coalesce(dd.delta, 0)) OVER (PARTITION BY g.user_id ORDER BY g.day
           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS distinct_merchants
  FROM grid g
  LEFT JOIN daily d USING (user_id, day)
  LEFT JOIN delta_day dd USING (user_id, day)
  WINDOW w AS (PARTITION BY g.user_id ORDER BY g.day
               ROWS BETWEEN {w} PRECEDING AND 1 PRECEDING)
)
SELECT user_id,
       day AS event_timestamp,
       coalesce(c, 0)::BIGINT AS user_txn_count_30d,
       CASE WHEN c > 0 THEN s / c END AS user_amount_mean_30d,
       CASE WHEN c > 1 THEN sqrt(greatest(ss - s * s / c, 0) / (c - 1)) END
         AS user_amount_std_30d,
       distinct_merchants::BIGINT AS user_distinct_merchants_30d,
       epoch(day - first_ts) / 86400.0 AS user_account_age_days,
       cu.home_utc_offset_hours::DOUBLE AS user_utc_offset_hours,
       -- circular mean of the UTC hours, none when they cancel out (no usual hour)
       CASE WHEN c > 0 AND sqrt(hs * hs + hc * hc) > {min_resultant} * c
            THEN (atan2(hs, hc) * 12 / pi() + 24) % 24 END AS user_usual_hour_30d
FROM rolled LEFT JOIN customers cu USING (user_id)
WHERE day > first_ts
ORDER BY event_timestamp, user_id
) TO '{out}' (FORMAT parquet);
"""

_MERCHANT_SQL = """
COPY (
WITH daily AS (
  SELECT merchant_id, day, count(*) AS c, sum(amount) AS s FROM tx GROUP BY ALL
), firsts AS (
  SELECT merchant_id, min(event_timestamp) AS first_ts, min(day) AS first_day
  FROM tx GROUP BY ALL
), grid AS (
  SELECT f.merchant_id, f.first_ts, g.d AS day
  FROM firsts f, bounds b,
       LATERAL unnest(generate_series(f.first_day, b.last_snapshot, INTERVAL 1 DAY)) AS g(d)
), frauds AS (
  -- a fraud counts for snapshot D when its transaction lies in [D-30d, D) and its label was
  -- known before D
  SELECT t.merchant_id,
         greatest(t.day + INTERVAL 1 DAY,
                  date_trunc('day', l.label_timestamp) + INTERVAL 1 DAY) AS start_day,
         t.day + INTERVAL {w} DAY AS end_day
  FROM tx t JOIN labels l USING (transaction_id)
  WHERE l.is_fraud = 1
), deltas AS (
  SELECT merchant_id, start_day AS day, 1 AS delta FROM frauds WHERE start_day <= end_day
  UNION ALL
  SELECT merchant_id, end_day + INTERVAL 1 DAY, -1 FROM frauds WHERE start_day <= end_day
), delta_day AS (SELECT merchant_id, day, sum(delta) AS delta FROM deltas GROUP BY ALL),
rolled AS (
  SELECT g.merchant_id, g.day, g.first_ts,
         sum(d.c) OVER w AS c, sum(d.s) OVER w AS s,
         sum(coalesce(dd.delta, 0)) OVER (PARTITION BY g.merchant_id ORDER BY g.day
           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS known_frauds
  FROM grid g
  LEFT JOIN daily d USING (merchant_id, day)
  LEFT JOIN delta_day dd USING (merchant_id, day)
  WINDOW w AS (PARTITION BY g.merchant_id ORDER BY g.day
               ROWS BETWEEN {w} PRECEDING AND 1 PRECEDING)
)
SELECT merchant_id,
       day AS event_timestamp,
       coalesce(c, 0)::BIGINT AS merchant_txn_count_30d,
       CASE WHEN c > 0 THEN s / c END AS merchant_amount_mean_30d,
       CASE WHEN c > 0 THEN known_frauds / c END AS merchant_fraud_rate_30d
FROM rolled
WHERE day > first_ts
ORDER BY event_timestamp, merchant_id
) TO '{out}' (FORMAT parquet);
"""


def build_profiles(root: Path | None = None) -> dict[str, int]:
    """Write both profile tables; return their row counts."""
    root = root or data_dir()
    out_dir = features_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    cust = customers_path(root)
    customers = (f"SELECT user_id, home_utc_offset_hours FROM read_parquet('{cust}')"
                 if cust.exists() else _NO_CUSTOMERS)
    counts = {}
    # progress: the log's load, then each table (a bar on a terminal, one INFO line at the end)
    with progress("batch features", total=3, unit="steps") as bar:
        bar.step("load the log")
        con.execute(
            _PRELUDE.format(tx_glob=transactions_dir(root) / "*" / "*.parquet",
                            labels=labels_path(root), customers=customers)
        )
        bar.update()
        for name, sql in (("user_profile", _USER_SQL), ("merchant_profile", _MERCHANT_SQL)):
            bar.step(name)
            out = out_dir / f"{name}.parquet"
            con.execute(sql.format(w=WINDOW_DAYS, out=out, min_resultant=MIN_RESULTANT))
            counts[name] = con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]  # type: ignore[index]
            bar.update()
        bar.note = f"({sum(counts.values()):,} snapshot rows)"
    con.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    show_summaries()
    t0 = time.perf_counter()
    counts = build_profiles()
    print(
        f"batch features: {counts['user_profile']:,} user and {counts['merchant_profile']:,} "
        f"merchant daily snapshots in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
