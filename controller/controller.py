"""One controller tick: read the cluster, decide, act, and account for it.

    ctl = Controller(settings, registry, scaler, metrics, ingress=source)
    actions = ctl.tick(t, slow)    read a `Snapshot` (one Redis round, and Serve's ingress
                                   refusals from `ingress` when given), turn it into an
                                   `Observation`, run the policy's fast loop (and its
                                   slow loop when `slow`), then apply each action:
                                     flip/repair  the routing table's role for the
                                                  instance (cleared when it goes home)
                                     threshold    the routing table's threshold
                                     scale        Serve's external scaler
                                   Each is logged with its inputs (one INFO line of
                                   JSON), appended to the registry's decision stream,
                                   and counted in the metrics; one that fails to apply
                                   is logged (WARNING, with its inputs) and counted
                                   as failed. Every tick also exports the pressures,
                                   the demand, the threshold and the replica counts.

Overrides of instances that left are pruned every tick. An action that fails to apply
(Redis or Serve unreachable) is logged and not retried: the policy goes back to the
threshold or replica count in force, and the next tick decides again from what it
reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from redis.exceptions import RedisError

from controller.metrics import Metrics
from controller.observe import Observer, Snapshot
from controller.policy import Action, ActionKind, Policy, pressures
from controller.refusals import IngressCounts
from controller.scaler import Scaler
from controller.settings import ControllerSettings
from registry import Registry, Role

logger = logging.getLogger(__name__)


class Controller:
    def __init__(
        self,
        settings: ControllerSettings,
        registry: Registry,
        scaler: Scaler | None = None,
        metrics: Metrics | None = None,
        record: Path | None = None,
        ingress: Callable[[], IngressCounts | None] | None = None,
    ) -> None:
        self.settings = settings
        self._ingress = ingress
        self._registry = registry
        self._scaler = scaler
        self._metrics = metrics
        self._record = record  # append each snapshot here (JSON lines), for replays
        self._observer = Observer()
        self.policy = Policy(
            settings.planner,
            settings.prefill_pool,
            settings.decode_pool,
            settings.replicas,
            settings.initial_threshold,
        )
        self.decisions: list[Action] = []

    def start(self) -> None:
        """Begin from the config: no overrides, the config's threshold; and from the
        replica counts Serve holds now (a pool the slow loop of a controller before this
        one scaled keeps its count)."""
        self._registry.routing.clear()
        self._registry.routing.set_threshold(self.policy.threshold)
        if self._scaler is None:
            return
        try:
            targets = self._scaler.targets()
        except Exception as e:  # Serve unreachable: the counts stay the config's
            logger.warning("reading Serve's replica targets failed: %s", e)
            return
        for pool in self.policy.replicas:
            if pool in targets and targets[pool] != self.policy.replicas[pool]:
                logger.info("pool %s has %d replicas in Serve (config: %d)",
                            pool, targets[pool], self.policy.replicas[pool])  # fmt: skip
                self.policy.replicas[pool] = targets[pool]

    def stop(self) -> None:
        """Back to the config, so that a cluster without its controller routes as
        configured."""
        self._registry.routing.clear()

    def tick(self, t: float, slow: bool) -> list[Action]:
        counts = self._ingress() if self._ingress is not None else None
        snap = Snapshot.read(self._registry, t, counts)
        if self._record is not None:
            with self._record.open("a") as fh:
                fh.write(snap.to_json() + "\n")
        self._registry.routing.prune_roles(i.instance_id for i in snap.instances)
        obs = self._observer.observe(snap)
        actions = self.policy.fast(obs)
        if slow:
            actions += self.policy.slow(obs)
        homes = {i.instance_id: i.role for i in snap.instances}
        for action in actions:
            self._apply(action, homes)
        if self._metrics is not None:
            self._metrics.tick(
                pressures(obs, self.settings.planner),
                obs.demand,
                self.policy.threshold,
                self.policy.replicas,
            )
        return actions

    def _apply(self, action: Action, homes: dict[str, Role]) -> None:
        record = action.record()
        try:
            routing = self._registry.routing
            if action.kind in (ActionKind.FLIP, ActionKind.REPAIR):
                assert action.to_role is not None
                if homes.get(action.instance_id) is action.to_role:
                    routing.clear_role(action.instance_id)
                else:
                    routing.set_role(action.instance_id, action.to_role)
            elif action.kind is ActionKind.THRESHOLD:
                routing.set_threshold(self.policy.threshold)
            elif action.kind is ActionKind.SCALE and self._scaler is not None:
                assert action.replicas is not None
                self._scaler.scale(action.pool, action.replicas[1])
            routing.log_decision(record)
        except (RedisError, OSError) as e:
            logger.warning("controller decision %s not applied: %s", json.dumps(record), e)
            self._not_applied(action)
            return
        except Exception:
            logger.exception("controller decision %s not applied", json.dumps(record))
            self._not_applied(action)
            return
        self.decisions.append(action)
        if self._metrics is not None:
            self._metrics.decided(action)
        logger.info("controller decision %s", json.dumps(record, sort_keys=True))

    def _not_applied(self, action: Action) -> None:
        """The policy holds what is in force: a threshold or replica count that was not
        set goes back to the one that is."""
        if action.kind is ActionKind.THRESHOLD and action.threshold is not None:
            self.policy.threshold = action.threshold[0]
        if action.kind is ActionKind.SCALE and action.replicas is not None:
            self.policy.replicas[action.pool] = action.replicas[0]
        if self._metrics is not None:
            self._metrics.failed(action)
