"""The versioned gRPC API (`pdserve.v1`) and its generated stubs."""
