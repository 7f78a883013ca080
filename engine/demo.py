"""Offline demo: a few chat prompts, streamed answers and tokens/s.

python -m engine.demo [--model NAME_OR_DIR] [--max-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.llm import LLM
from engine.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for writing clear code.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    llm = LLM(args.model, num_threads=args.threads)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s\n")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for question in PROMPTS:
        print(f">>> {question}")
        ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
        start = time.perf_counter()
        n = 0
        for out in llm.stream(ids, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n += len(out.new_token_ids)
        dt = time.perf_counter() - start
        print(f"\n[{n} tokens in {dt:.2f} s: {n / dt:.1f} tok/s]\n")

    batch = [[{"role": "user", "content": q}] for q in PROMPTS * 4]
    start = time.perf_counter()
    outs = llm.chat(batch, params)
    dt = time.perf_counter() - start
    total = sum(len(o.token_ids) for o in outs)
    print(f"batch of {len(batch)} chats: {total} tokens in {dt:.2f} s: {total / dt:.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
