"""Generated gRPC contract (from proto/sluice/v1): do not edit; run `make proto`."""
