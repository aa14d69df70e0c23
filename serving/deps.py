"""FastAPI dependencies: the scorer loaded by the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.scoring import Scorer


def get_scorer(request: Request) -> Scorer:
    return request.app.state.scorer  # type: ignore[no-any-return]


ScorerDep = Annotated[Scorer, Depends(get_scorer)]
