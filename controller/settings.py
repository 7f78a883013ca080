"""The controller's typed settings: the `planner` section of the cluster config
(`PlannerConfig`, validated when the config is built) and what the builder adds to it
for the actor (`ControllerSettings`).

Signals are pressures, 1.0 meaning "at capacity" (`controller.policy`):

* prefill pressure: queued prefill tokens per prefill-role instance over
  `prefill_full_tokens`, or the routers' mean queue time of remotely prefilled
  requests over `ttft_slo_s`, whichever is higher;
* decode pressure: running sequences per decode-role instance over `decode_full_seqs`,
  or the routers' mean TPOT over `tpot_slo_s`, whichever is higher.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PlannerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Start the controller with `pdserve up` (needs a prefill and a decode "
        "pool; both then serve either role).",
    )
    fast_period_s: float = Field(
        default=2.0, gt=0, le=60, description="Fast loop: role flips and the threshold."
    )
    slow_period_s: float = Field(
        default=30.0, gt=0, le=3600, description="Slow loop: replica counts."
    )
    sustain_ticks: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Fast ticks in a row that must want the same move before it is made.",
    )
    flip_at: float = Field(
        default=0.8,
        gt=0,
        description="Flip only while the busier role's pressure is at least this.",
    )
    flip_margin: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Flip only when it lowers the busier role's pressure by at least this "
        "share (a flip back would raise it again, so it is never wanted at once).",
    )
    flip_cooldown_s: float = Field(
        default=30.0,
        ge=0,
        description="An instance flipped is not flipped again within this time.",
    )
    min_flip_interval_s: float = Field(
        default=10.0, ge=0, description="At most one flip in the cluster within this time."
    )
    min_per_role: int = Field(
        default=1, ge=1, description="Instances that always stay in each role."
    )
    ttft_slo_s: float = Field(default=2.0, gt=0, description="TTFT target (queue time scale).")
    tpot_slo_s: float = Field(default=0.2, gt=0, description="TPOT target.")
    prefill_full_tokens: int = Field(
        default=2048,
        ge=1,
        description="Queued prefill tokens per prefill instance that count as full.",
    )
    decode_full_seqs: int = Field(
        default=16, ge=1, description="Running sequences per decode instance that count as full."
    )
    threshold_min: int = Field(default=0, ge=0, description="Lowest disaggregation threshold.")
    threshold_max: int = Field(default=1024, ge=0, description="Highest disaggregation threshold.")
    threshold_ratio: float = Field(
        default=1.5,
        gt=1,
        description="Move the threshold while one role's pressure is this many times the "
        "other's (and no flip is wanted).",
    )
    threshold_step: float = Field(
        default=2.0, gt=1, description="Factor of one threshold move (up or down)."
    )
    threshold_cooldown_s: float = Field(
        default=10.0, ge=0, description="Time between two threshold moves."
    )
    idle_pressure: float = Field(
        default=0.1,
        ge=0,
        description="Below this on both roles the cluster is idle and nothing moves.",
    )
    scaling: bool = Field(
        default=False,
        description="Slow loop: change replica counts through Serve's external scaler.",
    )
    scale_up_at: float = Field(
        default=1.0, gt=0, description="Add a replica while the busier role's pressure is this."
    )
    scale_down_at: float = Field(
        default=0.3, ge=0, description="Remove one while both roles' pressures are below this."
    )
    scale_cooldown_s: float = Field(
        default=120.0, ge=0, description="Time between two replica changes."
    )
    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas of each pool.")
    max_replicas: int = Field(default=4, ge=1, description="Most replicas of each pool.")

    @model_validator(mode="after")
    def _bounds(self) -> PlannerConfig:
        if self.threshold_min > self.threshold_max:
            raise ValueError("planner.threshold_min: must not exceed threshold_max")
        if self.min_replicas > self.max_replicas:
            raise ValueError("planner.min_replicas: must not exceed max_replicas")
        if self.scale_down_at >= self.scale_up_at:
            raise ValueError("planner.scale_down_at: must be below scale_up_at")
        if self.slow_period_s < self.fast_period_s:
            raise ValueError("planner.slow_period_s: must not be shorter than fast_period_s")
        return self


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller actor gets from the builder (never raw config)."""

    cluster: str
    app_name: str
    redis_url: str
    lease_ttl_s: float
    prefill_pool: str
    decode_pool: str
    replicas: dict[str, int]  # each pool's replicas at deploy time
    initial_threshold: int
    planner: PlannerConfig

    def __post_init__(self) -> None:
        if self.prefill_pool == self.decode_pool:
            raise ValueError("prefill_pool and decode_pool must differ")
        for pool in (self.prefill_pool, self.decode_pool):
            if pool not in self.replicas:
                raise ValueError(f"replicas: no count for pool {pool!r}")
