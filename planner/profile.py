"""Engine profiles: measured step times of each TP/PP layout, the cost models fitted
to them, and the KV transfer's time against bytes. A profile is a JSON file, typed and
validated on load (a bad field is named), written by `pdserve profile` and read by
`pdserve plan`.

Fits (weighted least squares on relative error, coefficients kept >= 0 by trying each
subset of terms, see `fit_nonneg`):

* prefill: seconds = a + b * tokens + c * sum of squared prompt lengths, over points of
  `batch` prompts of `tokens` each (b and c then apply to batch * tokens and
  batch * tokens^2);
* decode: seconds = a + b * batch + c * batch * context, over points of `batch`
  sequences of `context` tokens each;
* transfer: seconds = a + b * bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planner.costs import DecodeCost, PrefillCost, StepCost, TransferCost
from planner.simulator import ClusterModel

_STRICT = ConfigDict(extra="forbid")


class PrefillPoint(BaseModel):
    model_config = _STRICT
    tokens: int = Field(ge=1, description="Prompt tokens of each prompt in the step.")
    batch: int = Field(ge=1, description="Prompts in the step.")
    seconds: float = Field(gt=0, description="Best wall time of the step.")


class DecodePoint(BaseModel):
    model_config = _STRICT
    batch: int = Field(ge=1, description="Sequences decoding in the step.")
    context: int = Field(ge=1, description="KV tokens of each sequence.")
    seconds: float = Field(gt=0, description="Median wall time of one decode step.")


class TransferPoint(BaseModel):
    model_config = _STRICT
    nbytes: int = Field(ge=1, description="KV bytes moved.")
    seconds: float = Field(gt=0, description="Best wall time of the transfer.")


class Coefficients(BaseModel):
    model_config = _STRICT
    a: float = Field(ge=0)
    b: float = Field(ge=0)
    c: float = Field(default=0.0, ge=0)
    max_rel_error: float = Field(ge=0, description="Largest |fit/measured - 1| over the points.")


class LayoutProfile(BaseModel):
    model_config = _STRICT
    tp: int = Field(ge=1)
    pp: int = Field(ge=1)
    num_threads: int = Field(ge=1, description="torch threads of each rank.")
    prefill_points: list[PrefillPoint] = Field(min_length=1)
    decode_points: list[DecodePoint] = Field(min_length=1)
    prefill: Coefficients
    decode: Coefficients

    def step_cost(self) -> StepCost:
        p, d = self.prefill, self.decode
        return StepCost(PrefillCost(p.a, p.b, p.c), DecodeCost(d.a, d.b, d.c))


class TransferProfile(BaseModel):
    model_config = _STRICT
    transport: str = Field(description="torch_dist or shm.")
    method: str = Field(description="What was timed.")
    points: list[TransferPoint] = Field(min_length=1)
    fit: Coefficients

    def cost(self) -> TransferCost:
        return TransferCost(self.fit.a, self.fit.b)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    version: int = Field(default=1, ge=1, le=1)
    model: str = Field(description="The model source profiled.")
    dtype: str
    device: str = Field(description="cpu or cuda, and what it is.")
    created: str = Field(description="UTC time of the run.")
    kv_bytes_per_token: int = Field(ge=0, description="KV bytes of one token, whole model.")
    layouts: list[LayoutProfile] = Field(min_length=1)
    transfer: TransferProfile | None = None

    @model_validator(mode="after")
    def _unique(self) -> Profile:
        shapes = [(lp.tp, lp.pp) for lp in self.layouts]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"layouts: duplicate (tp, pp) in {shapes}")
        return self

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(lp.tp, lp.pp) for lp in self.layouts]

    def layout(self, tp: int, pp: int) -> LayoutProfile:
        for lp in self.layouts:
            if (lp.tp, lp.pp) == (tp, pp):
                return lp
        raise KeyError(f"the profile has no layout tp={tp} pp={pp}; it has {self.shapes}")

    def cluster_model(self) -> ClusterModel:
        costs = {(lp.tp, lp.pp): lp.step_cost() for lp in self.layouts}
        transfer = self.transfer.cost() if self.transfer else TransferCost(0.0, 0.0)

        def step_cost(tp: int, pp: int) -> StepCost:
            if (tp, pp) not in costs:
                raise KeyError(f"the profile has no layout tp={tp} pp={pp}")
            return costs[(tp, pp)]

        return ClusterModel(step_cost, transfer, self.kv_bytes_per_token)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read profile {path}: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [
                f"  {'.'.join(str(p) for p in err['loc']) or 'profile'}: {err['msg']}"
                for err in e.errors()
            ]
            raise ValueError(f"invalid profile {path}:\n" + "\n".join(lines)) from None


# ---- fitting ---------------------------------------------------------------------------


def fit_nonneg(rows: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares of relative error, all coefficients >= 0: every subset of the
    columns is solved and the best one whose solution is non-negative wins."""
    x = np.asarray(rows, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    w = 1.0 / t  # relative error: divide each row by its measurement
    xw, tw = x * w[:, None], t * w
    best: tuple[float, list[float]] | None = None
    cols = range(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(cols, k):
            sol, *_ = np.linalg.lstsq(xw[:, subset], tw, rcond=None)
            if np.any(sol < 0):
                continue
            coef = [0.0] * x.shape[1]
            for i, v in zip(subset, sol, strict=True):
                coef[i] = float(v)
            sse = float(np.sum((xw @ np.asarray(coef) - tw) ** 2))
            if best is None or sse < best[0]:
                best = (sse, coef)
    if best is None:  # only possible with no positive measurement
        raise ValueError("no non-negative fit")
    return best[1]


def _coefficients(rows: list[list[float]], y: list[float]) -> Coefficients:
    coef = fit_nonneg(rows, y)
    preds = [sum(c * v for c, v in zip(coef, r, strict=True)) for r in rows]
    worst = max(abs(p / s - 1.0) for p, s in zip(preds, y, strict=True))
    padded = [*coef, 0.0][:3]
    return Coefficients(a=padded[0], b=padded[1], c=padded[2], max_rel_error=worst)


def fit_prefill(points: Sequence[PrefillPoint]) -> Coefficients:
    rows = [[1.0, p.batch * p.tokens, p.batch * p.tokens**2] for p in points]
    return _coefficients(rows, [p.seconds for p in points])


def fit_decode(points: Sequence[DecodePoint]) -> Coefficients:
    rows = [[1.0, p.batch, p.batch * p.context] for p in points]
    return _coefficients(rows, [p.seconds for p in points])


def fit_transfer(points: Sequence[TransferPoint]) -> Coefficients:
    rows = [[1.0, float(p.nbytes)] for p in points]
    return _coefficients(rows, [p.seconds for p in points])
