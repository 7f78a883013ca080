"""Running the engine benchmark's peer (vLLM's CPU build) from pdserve's side.

`benchmarks/vllm_peer.py` runs under another virtualenv's python (`--peer-python`), so
nothing of vLLM is imported here: the job (token ids, sizes) goes to its stdin as
JSON and its figures come back on stdout. Every timed run gets prompts of its own
(windows of the same corpus at other offsets), so vLLM's prefix cache, which is on
by default, never serves a timed prefill; the untimed warm-up round uses the very
prompts pdserve and HF run, so the greedy tokens can be compared.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Timing
from benchmarks.engine_runs import DecodeResult, PrefillResult, long_prompt, make_prompts

log = logging.getLogger(__name__)

PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")
NAME = "vllm"
_MARK = "PEER_RESULT "


@dataclass(frozen=True)
class PeerResult:
    decode: dict[int, DecodeResult]
    prefill: PrefillResult
    tokens: dict[int, list[list[int]]]  # the warm-up round's greedy tokens, per batch
    python: str


def _shifted(corpus: list[int], r: int) -> list[int]:
    """The corpus rotated by round `r`, so that round's prompts differ from all others."""
    k = (r * 211) % len(corpus)
    return corpus[k:] + corpus[:k]


def run_peer(
    python: str,
    model_dir: Path,
    corpus: list[int],
    batches: list[int],
    out_len: int,
    prefill_len: int,
    repeats: int,
    threads: int,
    timeout_s: float = 1800.0,
    save_to: Path | None = None,
) -> PeerResult:
    """The peer's figures for the same sizes; with `save_to`, its answer is kept there
    too, for `load_peer` (several ISA builds of pdserve compare with one peer run)."""
    rounds = range(repeats + 1)  # round 0: the untimed warm-up, on pdserve's prompts

    def sets(shift: int) -> dict[str, list[list[list[int]]]]:
        return {
            str(b): [make_prompts(_shifted(corpus, 2 * r + shift), b) for r in rounds]
            for b in batches
        }

    job = {
        "model_dir": str(model_dir),
        "threads": threads,
        "out_len": out_len,
        "decode": sets(0),
        "first": sets(1),
        "prefill": [long_prompt(_shifted(corpus, 7 * r + 3), prefill_len) for r in rounds],
    }
    log.info("running the vLLM peer under %s", python)
    # Its own session, so that a timeout ends vLLM's engine processes too.
    proc = subprocess.Popen(
        [python, "-I", str(PEER_SCRIPT)],  # -I: no pdserve, nor its folder, on the path
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(json.dumps(job), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"the peer took more than {timeout_s:.0f} s") from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"the peer failed (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}"
        )
    data = json.loads(lines[-1][len(_MARK) :])
    if save_to is not None:
        save_to.write_text(json.dumps({"data": data, "job": job, "python": python}))
    return _parse(data, out_len, python, job)


def load_peer(path: Path, out_len: int) -> PeerResult:
    saved = json.loads(path.read_text())
    return _parse(saved["data"], out_len, str(saved["python"]), saved["job"])


def _parse(data: dict[str, Any], out_len: int, python: str, job: dict[str, Any]) -> PeerResult:
    if data.get("version") != 1:
        raise RuntimeError(f"the peer answered an unknown format: {str(data)[:200]}")
    decode = {}
    for key, res in data["decode"].items():
        batch = int(key)
        total = Timing(tuple(float(s) for s in res["e2e_s"]))
        first = Timing(tuple(float(s) for s in res["first_s"]))
        spent = tuple(t - first.median for t in total.samples)
        decode[batch] = DecodeResult(
            system=NAME,
            batch=batch,
            out_len=out_len,
            prompt_tokens=sum(len(p) for p in job["decode"][key][1]),
            total_s=total,
            first_s=first,
            decode_s=Timing(spent),
            step_s=Timing(tuple(s / (out_len - 1) for s in spent)),
        )
    prefill = PrefillResult(
        NAME, int(data["prefill_tokens"]), Timing(tuple(float(s) for s in data["prefill_s"]))
    )
    tokens = {int(k): [list(map(int, row)) for row in v] for k, v in data["tokens"].items()}
    return PeerResult(decode, prefill, tokens, python)
