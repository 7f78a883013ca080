"""The controller's decisions from a recorded run: `recorded/flip.jsonl` holds the
snapshots (load reports, routing table, the router's admission counts) that the
controller read every 0.5 s on a local cluster of one prefill and two decode replicas
(tests/integration/cluster/test_controller.py), first under short prompts, then under
long prompts from 6 clients, on a host at load average 20-80; `recorded/flip.json` its
settings. That run logged one decision: the flip of the idler decode instance to
prefill, two ticks into the long prompts' queueing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controller.observe import Observer, Snapshot
from controller.policy import Action, ActionKind, Policy, pressures
from controller.settings import PlannerConfig
from registry import Role

HERE = Path(__file__).parent / "recorded"
FLIPPED = "decode-1pm927v9"


def _setup() -> dict[str, Any]:
    out: dict[str, Any] = json.loads((HERE / "flip.json").read_text())
    return out


def _snapshots() -> list[Snapshot]:
    return [Snapshot.from_json(line) for line in (HERE / "flip.jsonl").read_text().splitlines()]


def replay(**changes: object) -> tuple[list[tuple[int, Action]], PlannerConfig]:
    setup = _setup()
    cfg = PlannerConfig.model_validate({**setup["planner"], **changes})
    pol = Policy(cfg, setup["prefill_pool"], setup["decode_pool"], setup["replicas"],
                 setup["threshold"])  # fmt: skip
    observer = Observer()
    out = []
    for i, snap in enumerate(_snapshots()):
        out += [(i, a) for a in pol.fast(observer.observe(snap))]
    return out, cfg


def test_the_recorded_run_replays_to_its_one_flip() -> None:
    decisions, cfg = replay()
    ((i, flip),) = decisions
    assert (flip.kind, flip.instance_id, flip.to_role) == (ActionKind.FLIP, FLIPPED, Role.PREFILL)
    snaps = _snapshots()
    observer = Observer()
    obs = [observer.observe(s) for s in snaps]
    # Nothing queued for prefill before the long prompts: no pressure, no decision.
    first_busy = next(j for j, o in enumerate(obs) if pressures(o, cfg).prefill >= cfg.flip_at)
    assert first_busy > 10 and i > first_busy
    # The flip came on the second tick in a row that wanted it.
    assert all(pressures(o, cfg).prefill >= cfg.flip_at for o in obs[i - 1 : i + 1])
    # It took the decode instance with fewer running sequences at that tick.
    loads = {x.instance_id: x.running_seqs for x in obs[i].instances if x.role is Role.DECODE}
    assert loads[FLIPPED] == min(loads.values())
    # From the next snapshot on, the routing table has it as a prefill instance.
    assert snaps[i + 1].routing.roles == {FLIPPED: Role.PREFILL}


def test_without_cooldowns_the_recording_still_wants_no_flip_back() -> None:
    """After the flip the load stays on prefill; the state it left never wants the
    reverse, cooldown or not (the hysteresis in level)."""
    decisions, _ = replay(flip_cooldown_s=0.0, min_flip_interval_s=0.0)
    assert [(a.instance_id, a.to_role) for _, a in decisions] == [(FLIPPED, Role.PREFILL)]


def test_a_longer_sustain_or_a_larger_reserve_changes_the_decision() -> None:
    # The recorded pressure came in runs of two ticks (a queue that drained between
    # reports): asking for three in a row, the controller would not have flipped.
    sustained, _ = replay(sustain_ticks=3)
    assert sustained == []
    reserved, _ = replay(min_per_role=2)  # the decode pool has no instance to spare
    assert reserved == []
