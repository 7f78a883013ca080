"""Changing a pool's replica count without redeploying: Serve's external scaler.

An application deployed with `external_scaler_enabled` (`serve.RunTarget`'s field in
Ray 2.60) accepts new replica targets from outside Serve's own autoscaler. Serve's
REST scale endpoint (`POST /api/v1/applications/{app}/deployments/{name}/scale` on the
dashboard) forwards each request to the Serve controller's
`update_deployment_replicas(DeploymentID, target)`; a local Ray here runs without the
dashboard, so the controller makes that same call on the Serve controller actor.
Serve then starts or stops replicas to reach the target; the others keep running.
`serve.run` is never called again: it would restart every replica.

`targets()` reads the targets Serve holds now (from the Serve controller's instance
details, what the dashboard's `/api/serve/applications/` shows), so that a controller
that took over from another starts from the counts in force, not the config's.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 30.0


class Scaler(Protocol):
    def scale(self, pool: str, replicas: int) -> None: ...

    def targets(self) -> dict[str, int]: ...


def _serve_controller() -> Any:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


class ServeScaler:
    def __init__(self, app_name: str) -> None:
        self._app = app_name

    def targets(self) -> dict[str, int]:
        """Each deployment's target replica count in the application ({} if Serve has
        no such application)."""
        import ray

        ref: Any = _serve_controller().get_serve_instance_details.remote()
        details: dict[str, Any] = ray.get(ref, timeout=_CALL_TIMEOUT_S)
        app = (details.get("applications") or {}).get(self._app) or {}
        return {
            name: int(d["target_num_replicas"])
            for name, d in (app.get("deployments") or {}).items()
            if d.get("target_num_replicas") is not None
        }

    def scale(self, pool: str, replicas: int) -> None:
        import ray
        from ray.serve._private.common import DeploymentID

        if replicas < 1:
            raise ValueError(f"replicas: at least 1, got {replicas}")
        ref: Any = _serve_controller().update_deployment_replicas.remote(
            DeploymentID(name=pool, app_name=self._app), replicas
        )
        ray.get(ref, timeout=_CALL_TIMEOUT_S)
        logger.info("asked Serve for %d replicas of %s/%s", replicas, self._app, pool)
