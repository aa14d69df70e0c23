"""Explain scores offline: each input's contribution to a transaction's score, as of its own time.

`python -m training.explain TRANSACTION_ID [...] [--model DIR] [--top 5] [--out FILE.parquet]`

Looks the transactions up in the log, builds their point-in-time rows with the model's own
feature service (`training.retrieval.training_frame`, the rows training fits on) and explains
them with `scoring.explain`, the function the HTTP scorer's `?explain=true` uses: for the same
row, the same numbers (TreeSHAP, in log-odds: base value + contributions = logit(score)).
Prints each transaction's score and its top reasons; `--out` writes every contribution.
Without `--model` the model is the one the scorer would serve.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scoring.artifact import Artifact, check_against_registry, load_artifact
from scoring.config import get_settings
from scoring.explain import Explanation, explain_frame
from scoring.loader import resolve_model_path
from training.retrieval import entity_frame, open_store, read_transactions, training_frame

KEYS = ["transaction_id", "user_id", "merchant_id", "event_timestamp"]


def explain_transactions(store: Any, artifact: Artifact, transactions: pd.DataFrame
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The point-in-time rows of transactions (log columns: transaction_id, user_id,
    merchant_id, amount, channel, event_timestamp) and their contributions (`explain_frame`:
    one column per model input, `base_value`, `margin`), both in the transactions' order."""
    frame = training_frame(store, artifact.feature_service, entity_frame(transactions))
    return frame, explain_frame(artifact, frame)


def explanations(frame: pd.DataFrame, contributions: pd.DataFrame, features: list[str]
                 ) -> list[Explanation]:
    """`explain_transactions`'s result as Explanations (values and reasons)."""
    return [Explanation(float(c["base_value"]), {f: float(c[f]) for f in features},
                        {f: None if pd.isna(v[f]) else float(v[f]) for f in features})
            for (_, v), (_, c) in zip(frame.iterrows(), contributions.iterrows(), strict=True)]


def format_explained(frame: pd.DataFrame, scores: np.ndarray, explained: list[Explanation],
                     top: int) -> str:
    lines = []
    for r, score, e in zip(frame.itertuples(index=False), scores, explained, strict=True):
        lines.append(f"{r.transaction_id} (user {r.user_id}, {r.event_timestamp}): score "
                     f"{score:.4f}, log-odds {e.margin:+.3f} = base {e.base_value:+.3f} + "
                     "contributions; top reasons:")
        for reason in e.reasons(top):
            value = "missing" if reason.value is None else f"{reason.value:.6g}"
            lines.append(f"  {reason.contribution:+8.3f}  {reason.direction:<6}  "
                         f"{reason.feature} = {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transaction_ids", nargs="+", metavar="TRANSACTION_ID")
    p.add_argument("--model", type=Path, help="artifact directory; default: the served model")
    p.add_argument("--top", type=int, default=5, help="reasons printed per transaction")
    p.add_argument("--out", type=Path, help="write every contribution to this parquet file")
    a = p.parse_args(argv)
    if a.top < 1:
        p.error("--top must be at least 1")
    log = read_transactions()
    wanted = list(dict.fromkeys(a.transaction_ids))
    found = log[log["transaction_id"].isin(wanted)].set_index("transaction_id")
    unknown = [t for t in wanted if t not in found.index]
    if unknown:
        p.error(f"not in the transaction log: {', '.join(unknown)}")
    artifact = load_artifact(a.model or resolve_model_path(get_settings()))
    store = open_store()
    check_against_registry(artifact, store)
    try:
        frame, contributions = explain_transactions(store, artifact,
                                                    found.loc[wanted].reset_index())
    except ValueError as exc:  # a model without an explainer
        p.error(str(exc))
    scores = artifact.model.predict_proba(frame[artifact.features].to_numpy("float64"))[:, 1]
    print(f"model {artifact.version}: TreeSHAP contributions in log-odds "
          "(score = 1 / (1 + exp(-log-odds)))")
    print(format_explained(frame, scores, explanations(frame, contributions, artifact.features),
                           a.top))
    if a.out is not None:
        out = frame[KEYS].assign(score=scores)
        pd.concat([out, contributions], axis=1).to_parquet(a.out, index=False)
        print(f"contributions of {len(out)} transactions: {a.out}")


if __name__ == "__main__":
    main()
