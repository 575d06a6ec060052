"""Measurement: what a pruned model costs in params, bytes, MACs and latency."""

from prunekit.analysis.profile import (
    LayerProfile,
    Profile,
    compare,
    csr_bytes,
    measure_latency,
    nm_bytes,
    profile,
)

__all__ = [
    "LayerProfile",
    "Profile",
    "compare",
    "csr_bytes",
    "measure_latency",
    "nm_bytes",
    "profile",
]
