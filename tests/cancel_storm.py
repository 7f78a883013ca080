"""Requests that their client abandons on purpose, for the cancel-storm fault test.

`cancel_over_http` sends a streamed /v1/completions and closes the connection either
after `delay_s` (before reading anything) or once `after_tokens` tokens arrived;
`cancel_over_grpc` does the same with a Generate call and `call.cancel()`. Each returns
how many tokens the client had seen when it cancelled (0: queued, prefilling or
transferring; more: decoding) or -1 when the request ended before the cancel (or was
refused). Every read is bounded by `timeout_s`.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import grpc

from cluster.client import Sampling, build_request
from cluster.client.sync import APPLICATION, call_metadata
from protos.pdserve.v1 import pdserve_pb2_grpc


def cancel_over_http(
    port: int, body: dict[str, Any], delay_s: float, after_tokens: int, timeout_s: float
) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        if after_tokens == 0:
            time.sleep(delay_s)
            return 0
        resp = conn.getresponse()
        if resp.status != 200:
            return -1
        seen = 0
        while seen < after_tokens:
            line = resp.readline().decode().strip()
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                return -1
            event = json.loads(payload)
            if "error" in event:
                return -1
            seen += sum(len(c["token_ids"]) for c in event["choices"])
        return seen
    finally:
        conn.close()  # the server sees the client go


def cancel_over_grpc(
    target: str,
    prompt: str,
    sampling: Sampling,
    delay_s: float,
    after_tokens: int,
    timeout_s: float,
) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        call: Any = stub.Generate(
            build_request(prompt, sampling=sampling),
            timeout=timeout_s,
            metadata=call_metadata(None, APPLICATION),
        )
        try:
            if after_tokens == 0:
                time.sleep(delay_s)
                return -1 if call.done() else 0
            seen = 0
            for msg in call:
                seen += len(msg.token_ids)
                if msg.finish_reason:
                    return -1
                if seen >= after_tokens:
                    return seen
            return -1
        except grpc.RpcError:
            return -1
        finally:
            call.cancel()
