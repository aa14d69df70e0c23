# temporary mutation checks (deleted after use)
import bisect
import pytest
import feature_repo.velocity as fv
from tests import test_point_in_time as pit
from tests.test_point_in_time import *  # noqa

_orig_as_of = pit.as_of

def leaky_window(recent_txn_ts, recent_amounts, recent_merchants, known, first, request_ts_us, merchant_id):
    # counts the transaction at t itself
    return _orig_wf(recent_txn_ts, recent_amounts, recent_merchants, known, first, request_ts_us + 1, merchant_id)

_orig_wf = fv.window_features

@pytest.fixture(scope="module", autouse=True)
def mutate(request):
    m = request.config.getoption("-k")
    mp = pytest.MonkeyPatch()
    import os
    kind = os.environ["MUT"]
    if kind == "leak":
        mp.setattr(fv, "window_features", leaky_window)
    elif kind == "strict":
        def strict_as_of(table, key, entities, ttl):
            e = entities.copy(); e["event_timestamp"] = e["event_timestamp"] - pd.Timedelta(microseconds=1)
            return _orig_as_of(table, key, e, ttl)
        mp.setattr(pit, "as_of", strict_as_of)
        globals()["as_of"] = strict_as_of
    elif kind == "ttl":
        def ttl_as_of(table, key, entities, ttl):
            return _orig_as_of(table, key, entities, ttl + pd.Timedelta(days=1))
        mp.setattr(pit, "as_of", ttl_as_of)
    yield
    mp.undo()
