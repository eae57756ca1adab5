"""Sluice: the command line, the flags every process shares, and the generated gRPC contract (sluice.v1)."""

__version__ = "0.1.0"
