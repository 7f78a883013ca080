"""The decode role: the decode pool's Ray Serve deployment (also the colocated pool's).

A replica preallocates KV blocks for a request whose prompt a prefill instance
computes, owns the wait for that KV (`remote_prefill`, `ranked_receiver`), runs
continuous-batching decode and streams tokens back to the router (`chunks`). What it
shares with the prefill role lives in `worker`.
"""
