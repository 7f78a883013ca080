"""Start a TP/PP engine's ranks as local processes (the offline API and tests).

Rank 0 stays in the calling process and drives the schedule; ranks 1..N-1 are
spawned processes running `run_rank`. In a cluster the same ranks are Ray actors
in the replica's placement group instead.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.process import BaseProcess

import torch

from engine.config import EngineConfig
from engine.parallel.comm import RankGroups, serve_store
from engine.parallel.layout import ParallelLayout
from engine.parallel.worker import run_rank

log = logging.getLogger(__name__)


class LocalRanks:
    def __init__(
        self, config: EngineConfig, timeout_s: float = 60.0, setup_timeout_s: float = 120.0
    ) -> None:
        """`timeout_s` bounds each collective; `setup_timeout_s` the ranks' start."""
        setup_timeout_s = max(setup_timeout_s, timeout_s)
        self._store, addr = serve_store(setup_timeout_s)
        ctx = mp.get_context("spawn")
        world = config.tp * config.pp
        self.procs: list[BaseProcess] = []
        for rank in range(1, world):
            p = ctx.Process(
                target=run_rank,
                args=(config, rank, addr, timeout_s, setup_timeout_s),
                name=f"engine-rank-{rank}",
                daemon=True,
            )
            p.start()
            self.procs.append(p)
        try:
            self.groups = RankGroups(
                ParallelLayout(config.tp, config.pp, 0),
                self._store,
                torch.device(config.device),
                timeout_s,
                setup_timeout_s=setup_timeout_s,
            )
        except BaseException:
            self.close()
            raise

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait for the ranks to exit (after the engine's STOP); kill stragglers."""
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                log.warning("rank process %s did not stop; terminating it", p.name)
                p.terminate()
                p.join(timeout_s)
        self.procs = []
