"""The router: HTTP in, token batches to shard groups over gRPC, text out. Never imports torch."""
