"""The KV-cache data plane from the prefill pool to the decode pool.

It will hold a small sender/receiver interface, the transports (`torch_dist`, `shm`
and an in-process fake), fault injection and the M:N layout mapping. It depends on
torch and on a rendezvous store interface only.
"""
