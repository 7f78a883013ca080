"""A pool replica that serves both roles; the routing table says which it takes."""
