"""`python -m benchmarks.kv_transfer` end to end at its smallest: two processes, a real
redis-server, every path and baseline of a length timed, the table and the JSON. Its
figures are not checked (a timed assertion on a shared host is wrong), only that every
row is there, measured, and computed against the right baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.kv_transfer import CASES, table

BASELINES = (
    "memcpy (1 thread)",
    "raw-gloo",
    "raw-gloo, cache-resident",
    "raw-gloo + a read per side",
)


def test_the_benchmark_times_every_path_and_baseline(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.kv_transfer",
        "--lengths",
        "16,48",
        "--dtypes",
        "fp32,bf16",
        "--repeats",
        "2",
        "--max-prefill-tokens",
        "0",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    (written,) = tmp_path.glob("kv_transfer-*.json")
    result = json.loads(written.read_text())
    rows = {(r["dtype"], r["tokens"], r["path"]): r for r in result["rows"]}
    labels = BASELINES + tuple(case.label for case in CASES)
    assert set(rows) == {(d, n, p) for d in ("fp32", "bf16") for n in (16, 48) for p in labels}
    for (dtype, tokens, path), row in rows.items():
        assert row["seconds"] > 0 and row["gbps"] > 0, row
        if path.startswith("torch_dist"):
            # vs base is against the raw stream over the transfer's bytes; vs res against
            # the cache-resident one: both follow from the rows' times
            raw = rows[(dtype, tokens, "raw-gloo")]
            resident = rows[(dtype, tokens, "raw-gloo, cache-resident")]
            assert row["nbytes"] == raw["nbytes"]
            assert abs(row["baseline_pct"] - 100 * raw["seconds"] / row["seconds"]) < 1e-6
            assert abs(row["resident_pct"] - 100 * resident["seconds"] / row["seconds"]) < 1e-6
        if path.startswith("shm"):
            memcpy = rows[(dtype, tokens, "memcpy (1 thread)")]
            assert abs(row["baseline_pct"] - 100 * row["gbps"] / memcpy["gbps"]) < 1e-6
    # 48 tokens are 3 blocks: 3x the bytes of one
    assert rows[("fp32", 48, "shm")]["nbytes"] == 3 * rows[("fp32", 16, "shm")]["nbytes"]
    assert rows[("bf16", 16, "shm")]["nbytes"] * 2 == rows[("fp32", 16, "shm")]["nbytes"]
    text = table(result)
    assert text in done.stdout and "raw-gloo, cache-resident" in text
