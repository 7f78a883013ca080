"""The engine benchmark's report from given figures: targets (HF, vLLM, the selection
against oneDNN), the table, the history line, the peer's answer and the --march argv."""

from __future__ import annotations

import json
import subprocess

from benchmarks import engine_isa
from benchmarks.common import Bandwidth, HostInfo, SourceState, Timing
from benchmarks.engine_isa import AVX2_CAPS, append_history, isa_class, without_flags
from benchmarks.engine_peer import _parse
from benchmarks.engine_report import (
    Report,
    Selection,
    Settings,
    history_record,
    table,
    targets,
)
from benchmarks.engine_runs import Agreement, DecodeResult, PrefillResult
from engine.linear_choice import Choice


def decode(system: str, batch: int, total: float, first: float) -> DecodeResult:
    t = Timing((total, total * 1.1))
    return DecodeResult(
        system, batch, 64, 40 * batch, t, Timing((first,)), Timing((total - first,)), t
    )


def peer_answer() -> tuple[dict, dict]:
    data = {
        "version": 1,
        "decode": {"1": {"e2e_s": [8.0, 9.0], "first_s": [0.1, 0.1]},
                   "32": {"e2e_s": [16.0], "first_s": [2.0]}},
        "prefill_s": [2.0, 2.2],
        "prefill_tokens": 1024,
        "tokens": {"1": [[1, 2, 3]], "32": [[4]] * 32},
    }  # fmt: skip
    job = {"decode": {"1": [[[9] * 40]] * 3, "32": [[[9] * 40] * 32] * 3}}
    return data, job


def report() -> Report:
    data, job = peer_answer()
    linear = Choice(
        {"one": "native", "decode": "native", "prefill": "onednn"},
        {
            "one": {"native": 0.010, "onednn": 0.020, "plain": 0.030},
            "decode": {"native": 0.040, "onednn": 0.050},
            "prefill": {"native": 0.9, "onednn": 0.6},
        },
    )
    fused = Choice({"one": "fused", "decode": "per-op"}, {"one": {}, "decode": {}}, True)
    host = HostInfo("t", "h", "x86_64", "Some CPU", 2, 2, 24.0, "2.13", 2, "3.11", (1, 1, 1))
    return Report(
        settings=Settings([1, 32], 2, 2, 64, 1024, 1 << 30, False, False, 0.0),
        host=host,
        source=SourceState("abc123", ()),
        model_dir="/m",
        weight_bytes_per_step=500_000_000,
        hf_weight_bytes_per_step=600_000_000,
        bandwidth=Bandwidth("read", 1 << 30, 2, Timing((0.05,))),
        roofline_tok_s=40.0,
        decode={
            1: {"pdserve": decode("pdserve", 1, 2.0, 0.1), "hf": decode("hf", 1, 4.0, 0.2)},
            32: {"pdserve": decode("pdserve", 32, 4.0, 1.0), "hf": decode("hf", 32, 12.0, 2)},
        },
        agreement={1: Agreement(1, 1, 64.0), 32: Agreement(32, 30, 60.0)},
        prefill={
            "pdserve": PrefillResult("pdserve", 1024, Timing((1.0,))),
            "hf": PrefillResult("hf", 1024, Timing((1.5,))),
        },
        prefill_first_token_agrees=True,
        targets=[],
        loadavg_end=(1, 1, 1),
        other_cores=dict.fromkeys(
            ("decode batch 1", "decode batch 32", "prefill", "whole run"), 0.1
        ),
        hf_attn_implementation="sdpa",
        selection=Selection("x86-64-v3", "AVX2", linear, fused, (True, False), "one native"),
        peer=_parse(data, 64, "/peer/python", job),
    )


def test_targets_cover_hf_vllm_and_the_selection() -> None:
    r = report()
    got = {t.name.strip(): (round(t.ratio, 3), t.passed) for t in targets(r)}
    assert got["batch-1 decode vs roofline"] == (round(63 / 1.9 / 40, 3), True)
    assert got["batch-32 output tok/s vs HF"] == (3.0, True)
    assert got["prefill 1024 tok vs HF"] == (1.5, True)
    assert got["prefill 1024 tok vs vLLM"] == (2.1, True)  # the median of 2.0 and 2.2 s
    assert got["batch-32 output tok/s vs vLLM"] == (round(16 / 4.2, 3), True)
    assert got["one rows: native vs oneDNN"] == (2.0, True)
    assert got["prefill rows: onednn vs oneDNN"] == (1.0, True)


def test_table_and_history_line(tmp_path) -> None:
    r = report()
    r.targets = targets(r)
    text = table(r)
    assert "-march=x86-64-v3 (AVX2)" in text and "fused decode, from the cache" in text
    assert "prefill 1024 tokens: vLLM 2.100 s" in text and "vllm" in text
    path = append_history(history_record(r), tmp_path / "h.jsonl")
    append_history(history_record(r), path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["isa"] == "AVX2"
    assert lines[0]["prefill_tok_s"] == {"tokens": 1024, "pdserve": 1024.0, "hf": 682.7,
                                         "vllm": 487.6}  # fmt: skip
    assert lines[0]["decode"]["32"]["vllm"] == 128.0
    assert lines[0]["targets"]["prefill 1024 tok vs vLLM"][2] is True


def test_peer_decode_only_time_subtracts_the_first_token_run() -> None:
    data, job = peer_answer()
    peer = _parse(data, 64, "p", job)
    assert peer.decode[32].decode_s.samples == (14.0,)
    assert peer.decode[1].prompt_tokens == 40 and peer.tokens[1] == [[1, 2, 3]]


def test_march_children_get_the_other_flags() -> None:
    argv = ["--march", "native,x86-64-v3", "--batches", "1,32", "--peer-python=/p", "--quick"]
    assert without_flags(argv, ("--march", "--peer-python")) == ["--batches", "1,32", "--quick"]
    assert isa_class("x86-64-v3") == "AVX2" and isa_class("x86-64-v4") == "AVX-512"


def test_an_avx2_child_runs_with_onednn_and_mkl_capped(monkeypatch, tmp_path) -> None:
    envs: dict[str, dict[str, str]] = {}

    def run(cmd: list[str], env: dict[str, str], **_: object) -> subprocess.CompletedProcess[str]:
        envs[env[engine_isa.MARCH_ENV]] = env
        return subprocess.CompletedProcess(cmd, 3 if "v3" in env[engine_isa.MARCH_ENV] else 0)

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(engine_isa.subprocess, "run", run)
    assert engine_isa.run_per_march(["x86-64-v4", "x86-64-v3"], ["--quick"], tmp_path) == 3
    assert all(envs["x86-64-v3"][k] == v for k, v in AVX2_CAPS.items())
    assert "ONEDNN_MAX_CPU_ISA" not in envs["x86-64-v4"]
