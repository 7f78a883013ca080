"""DistServe's toy example (OSDI'24, "DistServe: Disaggregating Prefill and Decoding for
Goodput-optimized Large Language Model Serving", Section 2 and Figure 1): a 13B model on
one 80 GB A100, every request 512 prompt tokens and 64 output tokens, SLOs P90 TTFT
0.4 s and P90 TPOT 0.04 s. The paper reports, per GPU: a colocated instance meets both
SLOs up to 1.6 rps; a prefill-only instance 5.6 rps and a decoding-only one 10 rps; so
2 prefill GPUs + 1 decoding GPU serve 10 rps, 3.3 rps per GPU (2.1x).

Step times used here (milliseconds in the source, seconds below):

* prefill: DistServe's published A100-80GB profile of the vLLM engine for OPT-13B at
  TP=1 (repository LLMServe/DistServe, file
  simdistserve/estimators/profile_data/profiler-a100-80g.vllm.json, key
  "facebook/opt-13b" / "1" / "prefill"): a = 23.627 ms, 0.15055 ms per token and
  8.6535e-6 ms per squared token, used unchanged (512 tokens: 103 ms);
* decode: the same file's "decoding_smallbs" (19.563 ms, 0.050606 ms per sequence,
  0.00049411 ms per context token) scaled by one factor, `DECODE_SCALE` = 1.32,
  chosen so that the simulated decoding-only instance serves the paper's 10 rps at P90
  TPOT 0.04 s. That is the only figure fitted to the paper.

The colocated instance schedules as the paper's baseline (vLLM of 2023) did: a step
with prompts waiting prefills only them (`mixed_steps=False`). The predictions to check
against the paper are then the prefill-only rate (uncalibrated), the colocated rate
and 2P1D's rate per GPU. KV transfer is left out (the paper's example ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.workload import Mix
from planner.costs import DecodeCost, PrefillCost, StepCost
from planner.layout import Layout, PoolShape
from planner.metrics import Slo, goodput
from planner.profile import (
    DecodePoint,
    LayoutProfile,
    PrefillPoint,
    Profile,
    fit_decode,
    fit_prefill,
)
from planner.simulator import ClusterModel, simulate
from planner.workload import Workload

DECODE_SCALE = 1.32
PREFILL = PrefillCost(23.62736227e-3, 0.15054561e-3, 8.65348374e-9)
DECODE = DecodeCost(
    DECODE_SCALE * 19.562534173678987e-3,
    DECODE_SCALE * 0.05060571771697455e-3,
    DECODE_SCALE * 0.0004941120550644942e-3,
)
MODEL = ClusterModel(lambda tp, pp: StepCost(PREFILL, DECODE))
WORKLOAD = Workload.from_mix(Mix.parse("fixed:512", "fixed:64"))
SLO = Slo(0.4, 0.04, 90)
UNBOUNDED = 1e9  # an SLO that is not judged
MANY = 64  # replicas enough that a pool never limits


@dataclass(frozen=True)
class Setup:
    name: str
    layout: Layout
    slo: Slo
    paper_rps: float  # the paper's goodput of the whole setup
    gpus: int  # GPUs the paper's figure counts

    @property
    def paper_rps_per_gpu(self) -> float:
        return self.paper_rps / self.gpus


def _layout(generating: int, prefill: int | None, mixed: bool = True) -> Layout:
    return Layout(
        PoolShape(generating),
        PoolShape(prefill) if prefill else None,
        threshold=0,
        max_batched_tokens=2048,
        max_num_seqs=256,
        mixed_steps=mixed,
    )


SETUPS = (
    Setup("prefill-only, 1 GPU", _layout(MANY, 1), Slo(0.4, UNBOUNDED), 5.6, 1),
    Setup("decoding-only, 1 GPU", _layout(1, MANY), Slo(UNBOUNDED, 0.04), 10.0, 1),
    Setup("colocated, 1 GPU", _layout(1, None, mixed=False), SLO, 1.6, 1),
    Setup("2 prefill + 1 decoding", _layout(1, 2), SLO, 10.0, 3),
)


@dataclass(frozen=True)
class Row:
    setup: Setup
    rps: float  # simulated goodput of the whole setup

    @property
    def rps_per_gpu(self) -> float:
        return self.rps / self.setup.gpus

    @property
    def error(self) -> float:
        """Relative error of the simulated rate against the paper's."""
        return self.rps / self.setup.paper_rps - 1.0


def run(setup: Setup, requests: int = 1000, seed: int = 1) -> Row:
    def attainment(rate: float) -> float:
        reqs = WORKLOAD.at_rate(rate, requests, seed)
        return simulate(setup.layout, MODEL, reqs).attainment(setup.slo)

    found = goodput(attainment, setup.slo.goal, high=40.0, rel_tol=0.005)
    return Row(setup, found.rate)


def profile() -> Profile:
    """The example's step times as a profile file's content (points computed from the
    coefficients above), so `pdserve plan` can plan for it."""
    prefill = [
        PrefillPoint(tokens=n, batch=b, seconds=PREFILL.time([(n, 0)] * b))
        for n in (128, 256, 512, 1024, 2048)
        for b in (1, 2, 4)
    ]
    decode = [
        DecodePoint(batch=b, context=c, seconds=DECODE.time(b, b * c))
        for b in (1, 8, 32, 128)
        for c in (256, 1024)
    ]
    layout = LayoutProfile(
        tp=1,
        pp=1,
        num_threads=1,
        prefill_points=prefill,
        decode_points=decode,
        prefill=fit_prefill(prefill),
        decode=fit_decode(decode),
    )
    return Profile(
        model="OPT-13B (DistServe's published vLLM step times; decode x1.32)",
        dtype="float16",
        device="A100-80GB (from the DistServe repository, not measured here)",
        created="2024 (OSDI'24 artifact)",
        kv_bytes_per_token=0,
        layouts=[layout],
    )
