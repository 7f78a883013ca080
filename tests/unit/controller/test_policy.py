"""The controller's policy on hand-made observations: the hysteresis in level and in
time, the cooldowns (no flip reversed within its cooldown), at least one instance per
role, repairs, threshold moves and the slow loop's replica changes."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.config import ClusterConfig
from cluster.config_file import load_config
from controller.policy import (
    ActionKind,
    Demand,
    InstanceLoad,
    Observation,
    Policy,
    pressures,
)
from controller.settings import PlannerConfig
from registry import Role

P, D = Role.PREFILL, Role.DECODE


def cfg(**kw: object) -> PlannerConfig:
    base: dict[str, object] = {
        "sustain_ticks": 2,
        "flip_cooldown_s": 30.0,
        "min_flip_interval_s": 5.0,
        "prefill_full_tokens": 100,
        "decode_full_seqs": 10,
        "threshold_cooldown_s": 10.0,
        "threshold_min": 16,
        "threshold_max": 256,
    }
    return PlannerConfig.model_validate({**base, **kw})


def inst(iid: str, home: Role, role: Role | None = None, q: int = 0, r: int = 0) -> InstanceLoad:
    return InstanceLoad(iid, home.value, home, role or home, True, q, r)


def policy(c: PlannerConfig, threshold: int = 64) -> Policy:
    return Policy(c, "prefill", "decode", {"prefill": 2, "decode": 2}, threshold)


def prompt_heavy(t: float, roles: dict[str, Role] | None = None) -> Observation:
    """2P 2D by home; prefill instances hold 300 queued tokens each, decodes 1 seq."""
    roles = roles or {}
    homes = {"p0": P, "p1": P, "d0": D, "d1": D}
    out = []
    for iid, home in homes.items():
        role = roles.get(iid, home)
        out.append(inst(iid, home, role, q=300 if role is P else 0, r=1 if role is D else 0))
    return Observation(t, tuple(out))


def test_pressures_take_the_worse_of_load_and_the_routers_timings() -> None:
    c = cfg(ttft_slo_s=2.0, tpot_slo_s=0.1)
    obs = prompt_heavy(0.0)
    p = pressures(obs, c)
    assert (p.prefill, p.decode, p.n_prefill, p.n_decode) == (3.0, 0.1, 2, 2)
    slow = dataclasses.replace(obs, demand=Demand(1.0, 10, 0, 10, 0.1, 8.0, 0.3, 0.05))
    p = pressures(slow, c)
    assert (p.prefill, p.decode) == (4.0, 0.5)  # remote queue 8 s / 2 s, TPOT 50 ms / 100 ms


def test_a_flip_needs_the_imbalance_for_sustain_ticks() -> None:
    pol = policy(cfg(sustain_ticks=3))
    assert pol.fast(prompt_heavy(0.0)) == []
    assert pol.fast(prompt_heavy(1.0)) == []
    (flip,) = pol.fast(prompt_heavy(2.0))
    assert (flip.kind, flip.to_role) == (ActionKind.FLIP, P)
    assert flip.instance_id in ("d0", "d1")
    assert flip.pressures.prefill == 3.0  # its inputs travel with it
    record = flip.record()
    assert record["kind"] == "flip" and record["to_role"] == "prefill"


def test_an_interrupted_streak_starts_over() -> None:
    pol = policy(cfg(sustain_ticks=2))
    assert pol.fast(prompt_heavy(0.0)) == []
    calm = Observation(
        1.0, tuple(inst(i, h) for i, h in (("p0", P), ("p1", P), ("d0", D), ("d1", D)))
    )
    assert pol.fast(calm) == []
    assert pol.fast(prompt_heavy(2.0)) == []
    assert len(pol.fast(prompt_heavy(3.0))) == 1


def test_after_a_flip_the_flip_back_is_not_wanted() -> None:
    """The hysteresis in level: the state a flip leaves does not want it undone."""
    pol = policy(cfg(flip_cooldown_s=0.0, min_flip_interval_s=0.0))
    pol.fast(prompt_heavy(0.0))
    (flip,) = pol.fast(prompt_heavy(1.0))
    roles = {flip.instance_id: P}
    # The same total prompt load, now over 3 prefill instances (200 tokens each).
    for t in range(2, 20):
        obs = prompt_heavy(float(t), roles)
        spread = tuple(
            dataclasses.replace(i, queued_prefill_tokens=200 if i.role is P else 0)
            for i in obs.instances
        )
        actions = pol.fast(dataclasses.replace(obs, instances=spread))
        assert all(a.kind is not ActionKind.FLIP for a in actions), actions


def test_the_last_instance_of_a_role_never_flips() -> None:
    pol = policy(cfg(sustain_ticks=1, min_flip_interval_s=0.0))
    obs = Observation(
        0.0, (inst("p0", P, q=0), inst("d0", D, r=100), inst("d1", D, r=100), inst("d2", D, r=100))
    )
    for t in range(10):
        actions = pol.fast(dataclasses.replace(obs, t=float(t)))
        assert [a.kind for a in actions if a.kind is not ActionKind.THRESHOLD] == []


def test_min_per_role_is_honoured_above_one() -> None:
    pol = policy(cfg(sustain_ticks=1, min_per_role=2, min_flip_interval_s=0.0))
    for t in range(5):
        actions = pol.fast(prompt_heavy(float(t)))  # 2P 2D: no donor can spare one
        assert [a.kind for a in actions if a.kind is not ActionKind.THRESHOLD] == []


def test_a_role_left_empty_is_repaired_at_once() -> None:
    pol = policy(cfg(sustain_ticks=5))
    obs = Observation(0.0, (inst("p0", P, D), inst("d0", D), inst("d1", D)))
    (repair,) = pol.fast(obs)
    assert (repair.kind, repair.to_role, repair.instance_id) == (ActionKind.REPAIR, P, "p0")


def test_the_instance_chosen_goes_home_first_then_the_least_loaded() -> None:
    pol = policy(cfg(sustain_ticks=1, min_flip_interval_s=0.0, flip_cooldown_s=0.0))
    obs = Observation(
        0.0,
        (
            inst("p0", P, q=500),
            inst("p1", P, D, r=3),  # away from home: returns first, though busier
            inst("d0", D, r=0),
            inst("d1", D, r=1),
        ),
    )
    (flip,) = pol.fast(obs)
    assert flip.instance_id == "p1"
    pol2 = policy(cfg(sustain_ticks=1))
    obs2 = Observation(0.0, (inst("p0", P, q=500), inst("d0", D, r=2), inst("d1", D, r=1)))
    (flip2,) = pol2.fast(obs2)
    assert flip2.instance_id == "d1"


def test_cooldowns_hold_back_the_next_flip() -> None:
    c = cfg(sustain_ticks=1, min_flip_interval_s=5.0, flip_cooldown_s=30.0)
    pol = Policy(c, "prefill", "decode", {"prefill": 1, "decode": 4}, 64)
    homes = [("p0", P), ("d0", D), ("d1", D), ("d2", D), ("d3", D)]
    roles: dict[str, Role] = {}
    times = []
    for t in range(0, 40):
        obs = Observation(
            float(t),
            tuple(
                inst(i, h, roles.get(i, h), q=1000 if roles.get(i, h) is P else 0) for i, h in homes
            ),
        )
        for a in pol.fast(obs):
            if a.kind is ActionKind.FLIP:
                roles[a.instance_id] = P
                times.append(t)
    assert times and all(b - a >= 5 for a, b in itertools.pairwise(times))


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 40)), min_size=5, max_size=60),
    n_prefill=st.integers(1, 3),
    n_decode=st.integers(1, 3),
)
def test_no_flip_is_reversed_within_its_cooldown_and_roles_keep_one(
    loads: list[tuple[int, int]], n_prefill: int, n_decode: int
) -> None:
    """Any sequence of prompt and decode loads, spread over the instances of each
    role as the router spreads them, one tick a second."""
    c = cfg(sustain_ticks=1, min_flip_interval_s=0.0, flip_cooldown_s=7.0)
    homes = [(f"p{i}", P) for i in range(n_prefill)] + [(f"d{i}", D) for i in range(n_decode)]
    roles = dict(homes)
    pol = Policy(c, "prefill", "decode", {"prefill": n_prefill, "decode": n_decode}, 64)
    last: dict[str, tuple[float, Role]] = {}
    for t, (tokens, seqs) in enumerate(loads):
        n_p = sum(r is P for r in roles.values())
        n_d = len(roles) - n_p
        obs = Observation(
            float(t),
            tuple(
                inst(i, h, roles[i], q=tokens // n_p if roles[i] is P else 0,
                     r=seqs // n_d if roles[i] is D else 0)
                for i, h in homes
            ),
        )  # fmt: skip
        for a in pol.fast(obs):
            if a.kind is ActionKind.THRESHOLD:
                continue
            assert a.to_role is not None
            prev = last.get(a.instance_id)
            if prev is not None and a.kind is ActionKind.FLIP:
                assert t - prev[0] >= c.flip_cooldown_s, (a, prev)
            last[a.instance_id] = (float(t), a.to_role)
            roles[a.instance_id] = a.to_role
        assert sum(r is P for r in roles.values()) >= 1
        assert sum(r is D for r in roles.values()) >= 1


def test_the_threshold_moves_toward_the_idle_role_within_bounds() -> None:
    c = cfg(sustain_ticks=2, threshold_cooldown_s=10.0, flip_at=1e9)  # no flips
    pol = policy(c, threshold=64)
    moves = []
    for t in range(0, 60):
        moves += pol.fast(prompt_heavy(float(t)))
    assert [m.threshold for m in moves] == [(64, 128), (128, 256)]  # capped at the max
    assert moves[1].t - moves[0].t >= 10.0
    decode_heavy = Observation(
        100.0, tuple(inst(i, h, r=40 if h is D else 0) for i, h in (("p0", P), ("d0", D)))
    )
    down = []
    for t in range(100, 200):
        down += pol.fast(dataclasses.replace(decode_heavy, t=float(t)))
    assert [m.threshold for m in down] == [(256, 128), (128, 64), (64, 32), (32, 16)]


def test_an_idle_cluster_moves_nothing() -> None:
    pol = policy(cfg(sustain_ticks=1))
    idle = Observation(0.0, tuple(inst(i, h) for i, h in (("p0", P), ("d0", D), ("d1", D))))
    for t in range(20):
        assert pol.fast(dataclasses.replace(idle, t=float(t))) == []


def test_the_slow_loop_adds_on_pressure_or_refusals_and_removes_when_idle() -> None:
    c = cfg(scaling=True, scale_cooldown_s=50.0, max_replicas=4, flip_at=1e9, threshold_ratio=1e9)
    pol = policy(c)
    for t in range(5):
        pol.fast(prompt_heavy(float(t)))
    (up,) = pol.slow(prompt_heavy(5.0))
    assert (up.kind, up.pool, up.replicas) == (ActionKind.SCALE, "prefill", (2, 3))
    for t in range(6, 10):
        pol.fast(prompt_heavy(float(t)))
    assert pol.slow(prompt_heavy(10.0)) == []  # cooldown
    idle = Observation(60.0, tuple(inst(i, h) for i, h in (("p0", P), ("d0", D))))
    refused = dataclasses.replace(idle, demand=Demand(1.0, 10, 4))
    pol.fast(refused)
    (again,) = pol.slow(refused)
    assert again.replicas == (3, 4) and "4 refused" in again.reason
    pol.fast(dataclasses.replace(idle, t=120.0))
    (down,) = pol.slow(dataclasses.replace(idle, t=120.0))
    assert down.replicas is not None and down.replicas[1] == down.replicas[0] - 1


def test_an_idle_cluster_shrinks_the_pool_above_its_fewest() -> None:
    c = cfg(scaling=True, scale_cooldown_s=0.0, max_replicas=4, flip_at=1e9, threshold_ratio=1e9)
    pol = Policy(c, "prefill", "decode", {"prefill": 3, "decode": 1}, 64)
    idle = Observation(0.0, tuple(inst(i, h) for i, h in (("p0", P), ("d0", D))))
    downs = []
    for t in range(1, 5):
        obs = dataclasses.replace(idle, t=float(t))
        pol.fast(obs)
        downs += pol.slow(obs)
    # Both idle (P = D = 0): decode counts as the less busy role but is at its fewest,
    # so prefill gives up replicas down to its fewest, then nothing moves.
    assert [(a.pool, a.replicas) for a in downs] == [("prefill", (3, 2)), ("prefill", (2, 1))]
    assert pol.replicas == {"prefill": 1, "decode": 1}


def test_the_slow_loop_is_off_without_scaling() -> None:
    pol = policy(cfg(flip_at=1e9))
    pol.fast(prompt_heavy(0.0))
    assert pol.slow(prompt_heavy(100.0)) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold_min", 2000, "threshold_min"),
        ("min_replicas", 9, "min_replicas"),
        ("scale_down_at", 2.0, "scale_down_at"),
        ("slow_period_s", 0.5, "slow_period_s"),
        ("flip_margin", 1.5, "flip_margin"),
        ("min_per_role", 0, "min_per_role"),
    ],
)
def test_bad_planner_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PlannerConfig.model_validate({field: value})


def test_the_controller_needs_a_prefill_and_a_decode_pool() -> None:
    with pytest.raises(ValidationError, match=r"planner\.enabled"):
        ClusterConfig.model_validate(
            {"planner": {"enabled": True}, "pools": [{"name": "all", "role": "colocated"}]}
        )
    config = load_config(None, ["planner.enabled=true", "planner.fast_period_s=1"])
    assert config.planner.enabled and config.planner.fast_period_s == 1.0
