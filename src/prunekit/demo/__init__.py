"""``prunekit demo``: the chapter's whole practice on mnist5k, offline, as one report.

LeNet-300-100 and LeNet-5 train once; then, each a section of ``runs/demo/report.html``
with its table (also printed) and figures:

=========================  ===============================================================
granularity                every granularity on the trained layers: masks, 3-D conv mask,
                           weight histograms, accuracy at 50%
criteria / scope           magnitude, gradient, Taylor, L1 / L2 rows, random; local vs
                           global with per-layer density bars
accuracy vs sparsity       :func:`prunekit.analysis.sweep` with the random baseline, seeds
one-shot vs iterative      :func:`prunekit.training.iterative_pruning`
when to prune              after, during (cubic :class:`~prunekit.Pruner`, soft filter
                           pruning), before (SNIP, SynFlow, random); a lottery ticket with
                           rewinding and its random re-init control
savings                    :func:`prunekit.shrink` with MACs and latency; 2:4 bytes
=========================  ===============================================================
"""

from prunekit.demo.run import run_demo, wide_console

__all__ = ["run_demo", "wide_console"]
