"""gRPC serving of the BiFusion encoder: wire <-> frames, batching, guards and metrics."""
