"""The controller's decisions: a pure function of what it observed and what it did.

    policy = Policy(config, prefill_pool, decode_pool, replicas, threshold)
    actions = policy.fast(observation)   every fast period: at most one role flip, or
                                         one threshold move
    actions = policy.slow(observation)   every slow period: at most one replica change

No I/O and no clock of its own (`Observation.t`), so a recorded sequence of
observations replays to the same decisions. Each `Action` carries its inputs.

The fast loop, one tick:

1. The pressures (`pressures`): prefill P and decode D, 1.0 being "at capacity".
2. Repair: a role left with fewer than `min_per_role` instances (an instance died, or
   Serve removed a replica) gets one from the other role at once.
3. Balance: flipping one instance from the role with slack to the busier one is wanted
   when the busier role's pressure is at least `flip_at` and, with the load spread
   over the new counts, the higher of the two pressures drops by at least
   `flip_margin`. The reverse flip would raise it back, so it is not wanted by the
   same state: that is the hysteresis in level. The same direction must be wanted for
   `sustain_ticks` ticks in a row (hysteresis in time), the last flip must be
   `min_flip_interval_s` old, and the instance flipped must not have been flipped
   within `flip_cooldown_s` (so no flip is reversed within its cooldown). Each role
   keeps at least `min_per_role` instances. The instance chosen is a switchable one
   of the role with slack, preferring one whose home is the busier role, then the
   least loaded.
4. Threshold: when no flip is wanted but one role's pressure stays `threshold_ratio`
   times the other's for `sustain_ticks` ticks, the disaggregation threshold moves by
   `threshold_step`: up when prefill is busier (decode instances prefill more prompts
   themselves), down when decode is (more prompts go to prefill instances); within
   [threshold_min, threshold_max], at most once per `threshold_cooldown_s`.

The slow loop adds a replica to the pool of the busier role while its mean pressure
since the last slow tick is at least `scale_up_at` or requests were refused (by the
routers or by Serve's proxies before them), and
removes one from the pool of the less busy role (or of the other role, when that pool
is at `min_replicas`) while both are below `scale_down_at`; within [min_replicas,
max_replicas], at most once per `scale_cooldown_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from controller.settings import PlannerConfig
from registry.types import Role


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    pool: str
    home: Role  # its pool's role
    role: Role  # the role it is routed as now
    switchable: bool
    queued_prefill_tokens: int
    running_seqs: int


@dataclass(frozen=True)
class Demand:
    """The routers' counts over the interval since the previous observation."""

    interval_s: float = 0.0
    arrived: int = 0  # refused ones included
    refused: int = 0  # by the routers, or before them by Serve's proxies
    finished: int = 0
    mean_queue_s: float | None = None
    mean_remote_queue_s: float | None = None  # of those prefilled remotely
    mean_ttft_s: float | None = None
    mean_tpot_s: float | None = None
    refused_at_ingress: int = 0  # of `refused`: by Serve's proxies (`controller.refusals`)

    @property
    def arrival_rate(self) -> float:
        return self.arrived / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True)
class Observation:
    t: float  # seconds, monotonic
    instances: tuple[InstanceLoad, ...]
    demand: Demand = field(default_factory=Demand)


class ActionKind(StrEnum):
    FLIP = "flip"
    REPAIR = "repair"  # a flip that restores min_per_role
    THRESHOLD = "threshold"
    SCALE = "scale"


@dataclass(frozen=True)
class Pressures:
    prefill: float
    decode: float
    n_prefill: int
    n_decode: int


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    t: float
    pressures: Pressures
    demand: Demand
    reason: str
    instance_id: str = ""  # FLIP, REPAIR
    to_role: Role | None = None  # FLIP, REPAIR
    threshold: tuple[int, int] | None = None  # THRESHOLD: (from, to)
    pool: str = ""  # SCALE
    replicas: tuple[int, int] | None = None  # SCALE: (from, to)

    def record(self) -> dict[str, object]:
        """The decision and its inputs, as JSON-encodable fields."""
        p, d = self.pressures, self.demand
        out: dict[str, object] = {
            "kind": self.kind.value,
            "t": round(self.t, 3),
            "reason": self.reason,
            "prefill_pressure": round(p.prefill, 4),
            "decode_pressure": round(p.decode, 4),
            "n_prefill": p.n_prefill,
            "n_decode": p.n_decode,
            "interval_s": round(d.interval_s, 3),
            "arrived": d.arrived,
            "arrival_rate": round(d.arrival_rate, 4),
            "refused": d.refused,
            "refused_at_ingress": d.refused_at_ingress,
            "finished": d.finished,
            "mean_queue_s": d.mean_queue_s,
            "mean_remote_queue_s": d.mean_remote_queue_s,
            "mean_ttft_s": d.mean_ttft_s,
            "mean_tpot_s": d.mean_tpot_s,
        }
        if self.kind in (ActionKind.FLIP, ActionKind.REPAIR):
            out["instance"] = self.instance_id
            out["to_role"] = self.to_role.value if self.to_role is not None else None
        if self.threshold is not None:
            out["threshold_from"], out["threshold_to"] = self.threshold
        if self.replicas is not None:
            out["pool"] = self.pool
            out["replicas_from"], out["replicas_to"] = self.replicas
        return out


def pressures(obs: Observation, cfg: PlannerConfig) -> Pressures:
    pre = [i for i in obs.instances if i.role is Role.PREFILL]
    dec = [i for i in obs.instances if i.role is Role.DECODE]
    p = sum(i.queued_prefill_tokens for i in pre) / max(1, len(pre)) / cfg.prefill_full_tokens
    d = sum(i.running_seqs for i in dec) / max(1, len(dec)) / cfg.decode_full_seqs
    if obs.demand.mean_remote_queue_s is not None:
        p = max(p, obs.demand.mean_remote_queue_s / cfg.ttft_slo_s)
    if obs.demand.mean_tpot_s is not None:
        d = max(d, obs.demand.mean_tpot_s / cfg.tpot_slo_s)
    return Pressures(p, d, len(pre), len(dec))


def _spread(p: Pressures, to: Role) -> tuple[float, float]:
    """The pressures once one instance moved to `to`, with the load spread evenly."""
    if to is Role.PREFILL:
        return p.prefill * p.n_prefill / (p.n_prefill + 1), p.decode * p.n_decode / (p.n_decode - 1)
    return p.prefill * p.n_prefill / (p.n_prefill - 1), p.decode * p.n_decode / (p.n_decode + 1)


class Policy:
    def __init__(
        self,
        cfg: PlannerConfig,
        prefill_pool: str,
        decode_pool: str,
        replicas: dict[str, int],
        threshold: int,
    ) -> None:
        self.cfg = cfg
        self.pools = {Role.PREFILL: prefill_pool, Role.DECODE: decode_pool}
        self.replicas = dict(replicas)
        self.threshold = min(max(threshold, cfg.threshold_min), cfg.threshold_max)
        self.last_flip: dict[str, float] = {}  # instance id -> t of its last flip
        self._last_any_flip = -float("inf")
        self._last_threshold = -float("inf")
        self._last_scale = -float("inf")
        self._streak: tuple[str, int] = ("", 0)  # wanted move, ticks in a row
        self._slow_sum = [0.0, 0.0, 0]  # P, D, ticks since the last slow tick
        self._window: list[Demand] = []  # the demand of those ticks

    # -- fast loop ----------------------------------------------------------------------

    def fast(self, obs: Observation) -> list[Action]:
        p = pressures(obs, self.cfg)
        self._slow_sum[0] += p.prefill
        self._slow_sum[1] += p.decode
        self._slow_sum[2] += 1
        self._window.append(obs.demand)
        repair = self._repair(obs, p)
        if repair is not None:
            return [repair]
        want = self._wanted_flip(p)
        move = want.value if want is not None else self._wanted_threshold(p)
        self._streak = (move, self._streak[1] + 1 if move and move == self._streak[0] else 1)
        if not move or self._streak[1] < self.cfg.sustain_ticks:
            return []
        if want is not None:
            flip = self._flip(obs, p, want)
            return [flip] if flip is not None else []
        moved = self._move_threshold(obs, p, move)
        return [moved] if moved is not None else []

    def _repair(self, obs: Observation, p: Pressures) -> Action | None:
        for role, n in ((Role.PREFILL, p.n_prefill), (Role.DECODE, p.n_decode)):
            donors = p.n_decode if role is Role.PREFILL else p.n_prefill
            if n < self.cfg.min_per_role and donors > self.cfg.min_per_role:
                chosen = self._choose(obs, role, ignore_cooldown=True)
                if chosen is not None:
                    return self._flipped(
                        ActionKind.REPAIR, obs, p, chosen, role, f"{role.value} has {n}"
                    )
        return None

    def _wanted_flip(self, p: Pressures) -> Role | None:
        cfg = self.cfg
        to = Role.PREFILL if p.prefill >= p.decode else Role.DECODE
        busy = max(p.prefill, p.decode)
        donors = p.n_decode if to is Role.PREFILL else p.n_prefill
        if busy < cfg.flip_at or donors <= cfg.min_per_role:
            return None
        after = max(_spread(p, to))
        return to if after <= busy * (1.0 - cfg.flip_margin) else None

    def _wanted_threshold(self, p: Pressures) -> str:
        cfg = self.cfg
        if max(p.prefill, p.decode) < cfg.idle_pressure:
            return ""
        if p.prefill >= cfg.threshold_ratio * max(p.decode, 1e-9):
            return "threshold-up" if self.threshold < cfg.threshold_max else ""
        if p.decode >= cfg.threshold_ratio * max(p.prefill, 1e-9):
            return "threshold-down" if self.threshold > cfg.threshold_min else ""
        return ""

    def _flip(self, obs: Observation, p: Pressures, to: Role) -> Action | None:
        if obs.t - self._last_any_flip < self.cfg.min_flip_interval_s:
            return None
        chosen = self._choose(obs, to, ignore_cooldown=False)
        if chosen is None:
            return None
        after = _spread(p, to)
        reason = (
            f"{to.value} busier: P {p.prefill:.2f} D {p.decode:.2f} -> "
            f"P {after[0]:.2f} D {after[1]:.2f}"
        )
        return self._flipped(ActionKind.FLIP, obs, p, chosen, to, reason)

    def _choose(self, obs: Observation, to: Role, *, ignore_cooldown: bool) -> str | None:
        """A switchable instance of the other role to move to `to`: home first, then
        the least loaded, then by id."""
        frm = Role.DECODE if to is Role.PREFILL else Role.PREFILL
        ok = [
            i
            for i in obs.instances
            if i.role is frm
            and i.switchable
            and (
                ignore_cooldown
                or obs.t - self.last_flip.get(i.instance_id, -float("inf"))
                >= self.cfg.flip_cooldown_s
            )
        ]
        if not ok:
            return None
        best = min(
            ok,
            key=lambda i: (
                i.home is not to,
                i.running_seqs if to is Role.PREFILL else i.queued_prefill_tokens,
                i.instance_id,
            ),
        )
        return best.instance_id

    def _flipped(
        self, kind: ActionKind, obs: Observation, p: Pressures, iid: str, to: Role, reason: str
    ) -> Action:
        self.last_flip[iid] = obs.t
        self._last_any_flip = obs.t
        self._streak = ("", 0)
        return Action(kind, obs.t, p, obs.demand, reason, instance_id=iid, to_role=to)

    def _move_threshold(self, obs: Observation, p: Pressures, move: str) -> Action | None:
        cfg = self.cfg
        if obs.t - self._last_threshold < cfg.threshold_cooldown_s:
            return None
        old = self.threshold
        if move == "threshold-up":
            new = min(cfg.threshold_max, max(old + 1, round(old * cfg.threshold_step)))
        else:
            new = max(cfg.threshold_min, round(old / cfg.threshold_step))
        if new == old:
            return None
        self.threshold = new
        self._last_threshold = obs.t
        self._streak = ("", 0)
        reason = f"P {p.prefill:.2f} D {p.decode:.2f}: {move}"
        return Action(ActionKind.THRESHOLD, obs.t, p, obs.demand, reason, threshold=(old, new))

    # -- slow loop ----------------------------------------------------------------------

    def slow(self, obs: Observation) -> list[Action]:
        cfg = self.cfg
        n = self._slow_sum[2]
        p_mean = self._slow_sum[0] / n if n else 0.0
        d_mean = self._slow_sum[1] / n if n else 0.0
        window = _total(self._window)
        refused = window.refused
        self._slow_sum = [0.0, 0.0, 0]
        self._window = []
        if not cfg.scaling or n == 0 or obs.t - self._last_scale < cfg.scale_cooldown_s:
            return []
        now = pressures(obs, cfg)
        p = Pressures(p_mean, d_mean, now.n_prefill, now.n_decode)
        busy = Role.PREFILL if p_mean >= d_mean else Role.DECODE
        idle = Role.DECODE if busy is Role.PREFILL else Role.PREFILL
        if max(p_mean, d_mean) >= cfg.scale_up_at or refused > 0:
            pool, delta = self.pools[busy], 1
            reason = f"mean P {p_mean:.2f} D {d_mean:.2f}, {refused} refused: add to {busy.value}"
        elif max(p_mean, d_mean) < cfg.scale_down_at and refused == 0:
            # The less busy role's pool, or the other one if that is at its fewest.
            shrink = idle if self.replicas[self.pools[idle]] > cfg.min_replicas else busy
            pool, delta = self.pools[shrink], -1
            reason = f"mean P {p_mean:.2f} D {d_mean:.2f}: remove from {shrink.value}"
        else:
            return []
        old = self.replicas[pool]
        new = min(cfg.max_replicas, max(cfg.min_replicas, old + delta))
        if new == old:
            return []
        self.replicas[pool] = new
        self._last_scale = obs.t
        return [Action(ActionKind.SCALE, obs.t, p, window, reason, pool=pool, replicas=(old, new))]


def _total(demands: list[Demand]) -> Demand:
    """The counts of the slow loop's window, summed (its inputs besides the mean
    pressures; the per-tick means are left out)."""
    return Demand(
        interval_s=sum(d.interval_s for d in demands),
        arrived=sum(d.arrived for d in demands),
        refused=sum(d.refused for d in demands),
        finished=sum(d.finished for d in demands),
        refused_at_ingress=sum(d.refused_at_ingress for d in demands),
    )
