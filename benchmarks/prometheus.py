"""A real Prometheus server for a benchmark: started on loopback, scraping the given
metrics exports, with its TSDB in a directory the caller owns; and its HTTP API.

    with PrometheusServer(["http://127.0.0.1:8080/metrics"], workdir, 2.0) as prom:
        prom.wait_scraping(timeout_s=60)
        matrix = prom.query_range("sum(rate(x_total[8s]))", start, end, step)

The binary is `prometheus` on PATH (`find_prometheus`; Debian and Ubuntu ship it as
the `prometheus` package). `start` waits, bounded, for `/-/ready`; `stop` sends
SIGTERM, waits, then kills. The server's log goes to `workdir/prometheus.log`.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the `prometheus` server is not on PATH. Install it, e.g. `apt-get install -y "
    "prometheus` on Debian/Ubuntu, or put a Prometheus 2.x release's `prometheus` "
    "binary on PATH"
)


class PrometheusError(RuntimeError):
    pass


def find_prometheus() -> str:
    """The `prometheus` binary's path; raises PrometheusError saying how to install it."""
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(INSTALL_HINT)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Matrix:
    """One series of a range query: its labels and its points (NaN kept)."""

    labels: dict[str, str]
    times: list[float]
    values: list[float]


def scrape_config(targets: list[str], interval_s: float) -> dict[str, Any]:
    """Prometheus's configuration: one job per metrics path, scraping `targets`."""
    jobs: dict[str, list[str]] = {}
    for url in targets:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise PrometheusError(f"metrics export {url!r}: want http://HOST:PORT/PATH")
        jobs.setdefault(u.path or "/metrics", []).append(f"{u.hostname}:{u.port}")
    interval = f"{round(interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {"job_name": f"ray{i}", "metrics_path": path, "static_configs": [{"targets": hosts}]}
            for i, (path, hosts) in enumerate(sorted(jobs.items()))
        ],
    }


class PrometheusServer:
    def __init__(self, targets: list[str], workdir: Path, scrape_interval_s: float) -> None:
        if not targets:
            raise PrometheusError("no metrics export to scrape")
        self.binary = find_prometheus()
        self.targets = list(targets)
        self.workdir = workdir
        self.scrape_interval_s = scrape_interval_s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Self:
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no YAML writer needed
        config.write_text(json.dumps(scrape_config(self.targets, self.scrape_interval_s)))
        log = (self.workdir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait(lambda: self._get("/-/ready", raw=True) is not None, timeout_s, "ready")
        except BaseException:
            self.stop()
            raise
        logger.info("prometheus %s on %s scraping %s", self._proc.pid, self.url, self.targets)
        return self

    def _wait(self, ok: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self._proc.returncode}): {self.log()}")
            try:
                if ok():
                    return
            except (OSError, PrometheusError):
                pass
            time.sleep(0.5)
        raise PrometheusError(f"prometheus not {what} in {timeout_s:.0f} s: {self.log()}")

    def log(self, tail: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def _get(self, path: str, params: dict[str, str] | None = None, raw: bool = False) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(self.url + path + query, timeout=30.0) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"{path}: HTTP {e.code}: {e.read()[:500]!r}") from None
        if raw:
            return body
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise PrometheusError(f"{path}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def version(self) -> str:
        return str(self._get("/api/v1/status/buildinfo").get("version", "?"))

    def wait_scraping(self, timeout_s: float = 60.0) -> None:
        """Until every target has been scraped successfully at least once."""

        def up() -> bool:
            active = self._get("/api/v1/targets")["activeTargets"]
            return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

        self._wait(up, timeout_s, f"scraping {self.targets}")

    def query_range(self, query: str, start: float, end: float, step_s: float) -> list[Matrix]:
        params = {
            "query": query,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s:g}",
        }
        data = self._get("/api/v1/query_range", params)
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"{query!r}: a {data.get('resultType')}, not a matrix")
        return [
            Matrix(
                dict(r["metric"]),
                [float(t) for t, _ in r["values"]],
                [float(v) for _, v in r["values"]],
            )
            for r in data["result"]
        ]

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
