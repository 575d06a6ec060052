"""Section: what each granularity removes (chapter 3.2.3), on the trained LeNets' own layers.

Every granularity prunes 50% of a copy of its model by magnitude (local scope, the
classifier fc3 kept dense: prunekit's default for a model's output layer), which is then
fine-tuned.
The figures show the masks on a trained layer, a conv mask in 3-D and the weight
distribution before and after.
"""

from __future__ import annotations

from prunekit.analysis import plots
from prunekit.analysis.report import Section
from prunekit.demo.context import Context
from prunekit.layers import weight_param

SPARSITY = 0.5
LINEAR = ("element", "2:4", "row", "column", "block:4x4")
CONV = ("element", "kernel", "filter", "channel")
TEXT = (
    "Each granularity prunes 50% of the weights by magnitude (2:4 fixes it at 50%), local "
    "scope, the classifier kept dense (the default), then one fine-tuning pass. Finer "
    "groups keep more accuracy; coarser ones are what hardware can skip. The figures draw "
    "every granularity's mask on the trained LeNet-5 (conv2, and fc1 for what conv2 cannot "
    "take; white: pruned), the kernel-pruned conv2 in 3-D, and LeNet-300-100 fc1's weights "
    "before and after element pruning and fine-tuning (a gap opens around zero)."
)


def section(ctx: Context) -> Section:
    """Prune each granularity on its LeNet, tabulate, and draw the granularity figures."""
    rows, pruned = [], {}
    for trained, granularities in ((ctx.lenet300, LINEAR), (ctx.lenet5, CONV)):
        for granularity in granularities:
            ctx.status(f"granularity {granularity} on {trained.name}")
            sparsity = None if granularity == "2:4" else SPARSITY
            model, row = ctx.prune_and_finetune(trained, sparsity, granularity=granularity)
            pruned[trained.name, granularity] = model
            rows.append({"model": trained.name, "granularity": granularity, **row})
    lenet5 = ctx.lenet5.model
    figures = {
        "granularity": plots.plot_granularity_masks(
            {"conv2": lenet5.conv2, "fc1": lenet5.fc1}, sparsity=SPARSITY
        ),
        "conv-mask-3d": plots.plot_conv_mask_3d(pruned["lenet5", "kernel"].conv2),
        "weights-histogram": plots.plot_weight_histogram(
            weight_param(ctx.lenet300.model.fc1), pruned["lenet300", "element"].fc1
        ),
    }
    return Section("Granularity", TEXT, rows, figures)
