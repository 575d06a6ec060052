"""Measurement and insight: what a pruned model costs (params, bytes, MACs, latency),
which layers tolerate pruning (sensitivity), and figures of both.

The figures live in :mod:`prunekit.analysis.plots`, imported on demand so that
``import prunekit`` does not load matplotlib.
"""

from prunekit.analysis.profile import (
    LayerProfile,
    Profile,
    compare,
    csr_bytes,
    measure_latency,
    nm_bytes,
    profile,
)
from prunekit.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity

__all__ = [
    "LayerProfile",
    "LayerSensitivity",
    "Profile",
    "SensitivityReport",
    "compare",
    "csr_bytes",
    "measure_latency",
    "nm_bytes",
    "profile",
    "sensitivity",
]
