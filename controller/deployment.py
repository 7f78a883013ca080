"""The controller as a Serve deployment: how a cluster deployed from a Serve config
(KubeRay's RayService, which `pdserve render k8s` writes) runs its controller.

    ControllerDeployment(settings)   one replica, part of the pdserve application
                                     (`cluster.builder.build_app(controller=True)`);
                                     runs the same loop as the detached actor
                                     (`controller.actor.ControllerActor`)
                                     and logs into the replica's log file
    check_health()                   Serve's periodic health check: fails once the loop
                                     thread has ended, so Serve replaces the replica
    __del__()                        Serve's shutdown of the replica (a redeploy, the
                                     application deleted): stops the loop, and if it
                                     held the lease clears the routing table

Serve keeps one replica running and starts another when it dies or fails its health
check. The lease (`registry.leader`) keeps a second one, which Serve may start while
the first is still shutting down, from acting until the first has let go. The
deployment takes no requests: it has no `__call__`, and the router only holds its
handle so that Serve deploys it with the application.
"""

from __future__ import annotations

import logging

from controller.actor import ControllerActor, log_to
from controller.settings import ControllerSettings

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "controller"


class ControllerDeployment:
    def __init__(self, settings: ControllerSettings) -> None:
        # Into the replica's log file, with Serve's own lines.
        log_to(list(logging.getLogger("ray.serve").handlers))
        self._loop = ControllerActor(settings)
        logger.info("controller of cluster %s started", settings.cluster)

    def check_health(self) -> None:
        if not self._loop.ready():
            raise RuntimeError("the controller's loop has ended")

    def decisions(self) -> list[dict[str, object]]:
        return self._loop.decisions()

    def leading(self) -> bool:
        return self._loop.leading()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()
