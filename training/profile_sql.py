"""The batch feature job's SQL: one text for DuckDB and Spark, exact integers only.

Every aggregate here is an integer (counts, sums of whole cents and of their squares, sums of
fixed-point sines and cosines, +1/-1 coverage deltas), so the result does not depend on the
order in which an engine adds rows up: DuckDB's segment trees and Spark's sliding frames give
the same numbers.  The floats are computed from them afterwards, in Python
(`training.batch_features`).

A transaction's time of day enters as the sine and cosine of its angle round the clock.
Engines' `sin`/`cos` differ in the last bit (glibc against the JVM's), so they are evaluated
here with `+` and `*` only, which both engines compute exactly as IEEE 754 prescribes: the
microsecond of the day is reduced to a quadrant with integer arithmetic, and Taylor
polynomials to x^23 give the sine and cosine there (within 4e-16 of libm's).  Each is
then rounded to a multiple of 2^-48 (`HOUR_SCALE`) and summed as a BIGINT: a user's window
holds at most 32,767 transactions (beyond, the sum may overflow, and both engines stop).

Amounts are summed as whole cents: `floor(amount * 100 + 0.5)`, exact for amounts with two
decimals (an amount with more is rounded to the cent).  Squares of cents are summed as
DECIMAL(38,0), and the deviation's numerator `c * sum(x^2) - sum(x)^2` is computed exactly
there too (no cancellation); a window whose sums overflow DECIMAL(38,0) stops the job in
both engines.  The SQL reads three relations the caller registers: `tx_raw(transaction_id,
user_id, merchant_id, amount, us)`, `labels_raw(transaction_id, is_fraud, label_us)` and
`customers(user_id, home_utc_offset_hours)`, with times in microseconds since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import factorial, pi

DAY_US = 86_400_000_000
QUADRANT_US = DAY_US // 4
AMOUNT_SCALE = 100  # amounts are summed in cents
HOUR_SCALE = 2**48  # a sine or cosine is summed as a multiple of 2^-48
_TAYLOR_TERMS = 12  # x^1 .. x^23 for the sine, x^0 .. x^22 for the cosine


@dataclass(frozen=True)
class Dialect:
    """What differs between the two engines' SQL."""

    div: str  # integer division operator
    series: str  # a SELECT-list call producing the rows {lo} .. {hi} (inclusive)
    keep: str  # statement prefix: a relation computed once, read by both profile queries


DUCKDB = Dialect(div="//", series="unnest(generate_series({lo}, {hi}))",
                 keep="CREATE OR REPLACE TEMP TABLE")
SPARK = Dialect(div="div", series="explode(sequence({lo}, {hi}))", keep="CACHE TABLE")


def _lit(x: float) -> str:
    """A DOUBLE literal both engines read back to exactly `x` (scientific notation is DOUBLE,
    not DECIMAL, in both; 17 significant digits round-trip)."""
    return f"{x:.16e}"


def _horner(var: str, coefficients: list[float]) -> str:
    expr = _lit(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        expr = f"({_lit(c)} + {var} * {expr})"
    return expr


_SIN = [(-1) ** k / factorial(2 * k + 1) for k in range(_TAYLOR_TERMS)]  # times x, in x^2
_COS = [(-1) ** k / factorial(2 * k) for k in range(_TAYLOR_TERMS)]  # in x^2
_RADIANS_PER_US = (pi / 2) / QUADRANT_US


def _fixed(expr: str) -> str:
    return f"CAST(floor({expr} * {_lit(HOUR_SCALE)} + {_lit(0.5)}) AS BIGINT)"


# sin/cos of (quadrant * pi/2 + x) from sin x (sx) and cos x (cx)
_SIN_T = "CASE quadrant WHEN 0 THEN sx WHEN 1 THEN cx WHEN 2 THEN -sx ELSE -cx END"
_COS_T = "CASE quadrant WHEN 0 THEN cx WHEN 1 THEN -sx WHEN 2 THEN -cx ELSE sx END"

_TX = f"""
{{keep}} tx AS
WITH t AS (
  SELECT transaction_id, user_id, merchant_id, amount, us,
         us {{div}} {DAY_US} AS day, us % {DAY_US} AS us_of_day
  FROM tx_raw
), q AS (
  SELECT *, us_of_day {{div}} {QUADRANT_US} AS quadrant,
         CAST(us_of_day % {QUADRANT_US} AS DOUBLE) * {_lit(_RADIANS_PER_US)} AS x
  FROM t
), q2 AS (SELECT *, x * x AS x2 FROM q),
p AS (
  SELECT *, x * {_horner("x2", _SIN)} AS sx, {_horner("x2", _COS)} AS cx FROM q2
)
SELECT transaction_id, user_id, merchant_id, us, day,
       CAST(floor(amount * {_lit(AMOUNT_SCALE)} + {_lit(0.5)}) AS BIGINT) AS cents,
       {_fixed(_SIN_T)} AS hs,
       {_fixed(_COS_T)} AS hc
FROM p
"""

_LABELS = f"""
CREATE OR REPLACE TEMP VIEW labels AS
SELECT transaction_id, is_fraud, label_us {{div}} {DAY_US} AS label_day FROM labels_raw
"""

LAST_DAY = "SELECT max(day) + 1 FROM tx"  # the last snapshot: the day after the log ends

# Dense (key, day) grid + row windows over the 30 preceding days; distinct merchants via +1/-1
# coverage intervals per (user, merchant) so the whole job stays a handful of linear scans.
_USER = """
WITH daily AS (
  SELECT user_id, day, count(*) AS c, sum(cents) AS s,
         sum(CAST(cents AS DECIMAL(38, 0)) * cents) AS ss, sum(hs) AS hs, sum(hc) AS hc
  FROM tx GROUP BY user_id, day
), firsts AS (
  SELECT user_id, min(us) AS first_us, min(day) AS first_day FROM tx GROUP BY user_id
), grid AS (
  SELECT user_id, first_us, {grid} AS day FROM firsts
), um AS (
  SELECT user_id, merchant_id, day,
         lead(day) OVER (PARTITION BY user_id, merchant_id ORDER BY day) AS next_day
  FROM (SELECT DISTINCT user_id, merchant_id, day FROM tx) AS seen
), deltas AS (
  SELECT user_id, day + 1 AS day, 1 AS delta FROM um
  UNION ALL
  SELECT user_id, least(day + {w}, coalesce(next_day, day + {w})) + 1 AS day, -1 AS delta
  FROM um
), delta_day AS (SELECT user_id, day, sum(delta) AS delta FROM deltas GROUP BY user_id, day),
rolled AS (
  SELECT g.user_id, g.day, g.first_us,
         sum(d.c) OVER w AS c, sum(d.s) OVER w AS s, sum(d.ss) OVER w AS ss,
         sum(d.hs) OVER w AS hs, sum(d.hc) OVER w AS hc,
         sum(coalesce(dd.delta, 0)) OVER (PARTITION BY g.user_id ORDER BY g.day
           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS distinct_merchants
  FROM grid g
  LEFT JOIN daily d ON d.user_id = g.user_id AND d.day = g.day
  LEFT JOIN delta_day dd ON dd.user_id = g.user_id AND dd.day = g.day
  WINDOW w AS (PARTITION BY g.user_id ORDER BY g.day
               ROWS BETWEEN {w} PRECEDING AND 1 PRECEDING)
)
SELECT r.user_id, r.day, r.first_us, CAST(r.c AS BIGINT) AS c, CAST(r.s AS BIGINT) AS s,
       -- c times the sum of squared deviations from the mean, in cents^2, exactly
       CAST(r.c AS DECIMAL(38, 0)) * r.ss - CAST(r.s AS DECIMAL(38, 0)) * r.s AS c_sq_dev,
       CAST(r.hs AS BIGINT) AS hs,
       CAST(r.hc AS BIGINT) AS hc, CAST(r.distinct_merchants AS BIGINT) AS distinct_merchants,
       CAST(cu.home_utc_offset_hours AS DOUBLE) AS home_utc_offset_hours
FROM rolled r LEFT JOIN customers cu ON cu.user_id = r.user_id
WHERE r.day * {day_us} > r.first_us
ORDER BY r.day, r.user_id
"""

_MERCHANT = """
WITH daily AS (
  SELECT merchant_id, day, count(*) AS c, sum(cents) AS s FROM tx GROUP BY merchant_id, day
), firsts AS (
  SELECT merchant_id, min(us) AS first_us, min(day) AS first_day FROM tx GROUP BY merchant_id
), grid AS (
  SELECT merchant_id, first_us, {grid} AS day FROM firsts
), frauds AS (
  -- a fraud counts for snapshot D when its transaction lies in [D-30d, D) and its label was
  -- known before D
  SELECT t.merchant_id, greatest(t.day + 1, l.label_day + 1) AS start_day, t.day + {w} AS end_day
  FROM tx t JOIN labels l ON l.transaction_id = t.transaction_id
  WHERE l.is_fraud = 1
), deltas AS (
  SELECT merchant_id, start_day AS day, 1 AS delta FROM frauds WHERE start_day <= end_day
  UNION ALL
  SELECT merchant_id, end_day + 1 AS day, -1 AS delta FROM frauds WHERE start_day <= end_day
), delta_day AS (
  SELECT merchant_id, day, sum(delta) AS delta FROM deltas GROUP BY merchant_id, day
), rolled AS (
  SELECT g.merchant_id, g.day, g.first_us,
         sum(d.c) OVER w AS c, sum(d.s) OVER w AS s,
         sum(coalesce(dd.delta, 0)) OVER (PARTITION BY g.merchant_id ORDER BY g.day
           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS known_frauds
  FROM grid g
  LEFT JOIN daily d ON d.merchant_id = g.merchant_id AND d.day = g.day
  LEFT JOIN delta_day dd ON dd.merchant_id = g.merchant_id AND dd.day = g.day
  WINDOW w AS (PARTITION BY g.merchant_id ORDER BY g.day
               ROWS BETWEEN {w} PRECEDING AND 1 PRECEDING)
)
SELECT merchant_id, day, first_us, CAST(c AS BIGINT) AS c, CAST(s AS BIGINT) AS s,
       CAST(known_frauds AS BIGINT) AS known_frauds
FROM rolled
WHERE day * {day_us} > first_us
ORDER BY day, merchant_id
"""


def views(dialect: Dialect) -> list[str]:
    """Statements defining `tx` (computed once) and `labels` over the raw relations."""
    return [_TX.format(div=dialect.div, keep=dialect.keep), _LABELS.format(div=dialect.div)]


def profile_queries(dialect: Dialect, last_day: int, window_days: int) -> dict[str, str]:
    """The integer aggregates of each profile table, one row per (key, snapshot day), ordered by
    (day, key): `day` in days since the epoch, `first_us` the key's first transaction."""
    grid = dialect.series.format(lo="first_day", hi=f"CAST({last_day} AS BIGINT)")
    return {name: sql.format(grid=grid, w=window_days, day_us=DAY_US)
            for name, sql in (("user_profile", _USER), ("merchant_profile", _MERCHANT))}
