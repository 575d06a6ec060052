"""Measurement and insight: what a pruned model costs (params, bytes, MACs, latency),
which layers tolerate pruning (sensitivity), sweeps over methods and seeds, figures
and self-contained reports.

The figures live in :mod:`prunekit.analysis.plots`, imported on demand so that
``import prunekit`` does not load matplotlib.
"""

from prunekit.analysis.profile import Profile, compare, profile
from prunekit.analysis.report import Section, write_report
from prunekit.analysis.sensitivity import SensitivityReport, sensitivity
from prunekit.analysis.sweep import SweepReport, sweep
from prunekit.analysis.timing import Speedup, measure_latencies, measure_latency, speedup

__all__ = [
    "Profile",
    "Section",
    "SensitivityReport",
    "Speedup",
    "SweepReport",
    "compare",
    "measure_latencies",
    "measure_latency",
    "profile",
    "sensitivity",
    "speedup",
    "sweep",
    "write_report",
]
