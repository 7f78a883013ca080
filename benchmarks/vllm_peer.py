"""The engine benchmark's peer: vLLM's offline `LLM` on the same weights and token ids.

Runs under the python of a separate virtualenv that holds vLLM's CPU build (the
engine benchmark starts it with `--peer-python`); it imports nothing from pdserve.
It reads one JSON job from stdin and writes one line `PEER_RESULT {json}` to stdout:

  job:    {"model_dir", "threads", "out_len", "decode": {"B": [[prompt ids] per row]
           per round]}, "first": {"B": rounds, as decode}, "prefill": [prompt ids per
           round]}
  result: {"version", "decode": {"B": {"e2e_s": [...], "first_s": [...]}},
           "prefill_s": [...], "prefill_tokens", "tokens": {"B": first round's ids}}

Round 0 of each list is an untimed warm-up. Every round gets its own prompts: vLLM's
prefix cache is on (its default), so a repeated prompt would skip its prefill. A
decode run generates `out_len` tokens per row (`ignore_eos`); a `first` run of the
same batch size generates one, which prices the prefill and first token, so decode-only
time is the difference of the medians. fp32, greedy, `threads` OpenMP threads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> None:
    job = json.loads(sys.stdin.read())
    threads = int(job["threads"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]
    from vllm.inputs import TokensPrompt  # type: ignore[import-not-found]

    prefill_len = len(job["prefill"][0])
    llm = LLM(
        model=job["model_dir"],
        dtype="float32",
        max_model_len=max(2048, prefill_len + 64),
        max_num_seqs=max(int(b) for b in job["decode"]),
        max_num_batched_tokens=max(2048, prefill_len),
        seed=0,
    )

    def timed(prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        reqs: Any = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        took = time.perf_counter() - t0
        return took, [list(o.outputs[0].token_ids) for o in outs]

    out: dict[str, Any] = {"version": 1, "decode": {}, "tokens": {}}
    for batch, rounds in job["decode"].items():
        e2e, first = [], []
        for i, (prompts, first_prompts) in enumerate(zip(rounds, job["first"][batch], strict=True)):
            s, tokens = timed(prompts, int(job["out_len"]))
            f, _ = timed(first_prompts, 1)
            if i == 0:
                out["tokens"][batch] = tokens
            else:
                e2e.append(s)
                first.append(f)
        out["decode"][batch] = {"e2e_s": e2e, "first_s": first}
    out["prefill_s"] = [timed([p], 1)[0] for p in job["prefill"]][1:]
    out["prefill_tokens"] = prefill_len
    sys.stdout.write("PEER_RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
