"""Measurement and insight: what a pruned model costs (params, bytes, MACs, latency),
which layers tolerate pruning (sensitivity), sweeps over methods and seeds, figures
and self-contained reports.

The figures live in :mod:`prunekit.analysis.plots`, imported on demand so that
``import prunekit`` does not load matplotlib.
"""

from prunekit.analysis.profile import (
    LayerProfile,
    Profile,
    compare,
    csr_bytes,
    measure_latencies,
    measure_latency,
    nm_bytes,
    profile,
)
from prunekit.analysis.report import Section, write_report
from prunekit.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity
from prunekit.analysis.sweep import SweepPoint, SweepReport, sweep

__all__ = [
    "LayerProfile",
    "LayerSensitivity",
    "Profile",
    "Section",
    "SensitivityReport",
    "SweepPoint",
    "SweepReport",
    "compare",
    "csr_bytes",
    "measure_latencies",
    "measure_latency",
    "nm_bytes",
    "profile",
    "sensitivity",
    "sweep",
    "write_report",
]
