"""The decode pool's Ray Serve deployment.

Each replica will preallocate KV blocks, receive a request's KV from a prefill
instance through a kv_transfer receiver, run continuous-batching decode and stream
tokens back to the router. Nothing is implemented here yet.
"""
