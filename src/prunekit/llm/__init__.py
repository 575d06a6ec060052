"""One-shot pruning of large language models, block by block on calibration data.

    import prunekit as pk
    report = pk.llm.prune(model, calibration_ids, method="wanda", sparsity=0.5)
    report = pk.llm.prune(model, calibration_ids, method="sparsegpt", sparsity="2:4")
    report = pk.llm.prune(model, calibration_ids, method="wanda", sparsity=0.7,
                          allocation="owl")
    pk.bake(model); model.save_pretrained("pruned")

    result = pk.llm.shrink(model, data=calibration_ids, target_params=0.5)   # smaller dense
    model.save_pretrained("small")       # plain transformers loads it

Modules: :mod:`~prunekit.llm.engine` (the sequential calibration engine),
:mod:`~prunekit.llm.methods` (magnitude / Wanda / SparseGPT per layer),
:mod:`~prunekit.llm.sparsegpt`, :mod:`~prunekit.llm.owl`, :mod:`~prunekit.llm.evaluate`
(perplexity, embedding similarity); width and depth pruning to a standard config:
:mod:`~prunekit.llm.shrink`, :mod:`~prunekit.llm.width`, :mod:`~prunekit.llm.depth`,
:mod:`~prunekit.llm.reshape`, :mod:`~prunekit.llm.anatomy`; the command ``prunekit llm``
is :mod:`prunekit.cli_llm`.
"""

from prunekit.llm.alps import ALPS
from prunekit.llm.depth import (
    angular_distance,
    block_influence,
    choose_layers,
    drop_layers,
    drop_loss,
)
from prunekit.llm.evaluate import embedding_similarity, perplexity
from prunekit.llm.offload import prune_checkpoint
from prunekit.llm.oneshot import prune
from prunekit.llm.report import LLMPruneReport
from prunekit.llm.shrink import ShrinkPlan, ShrinkResult, ShrinkSettings, shrink
from prunekit.llm.shrink import plan as plan_shrink
from prunekit.llm.width import WidthScores, width_importance

__all__ = [
    "ALPS",
    "LLMPruneReport",
    "ShrinkPlan",
    "ShrinkResult",
    "ShrinkSettings",
    "WidthScores",
    "angular_distance",
    "block_influence",
    "choose_layers",
    "drop_layers",
    "drop_loss",
    "embedding_similarity",
    "perplexity",
    "plan_shrink",
    "prune",
    "prune_checkpoint",
    "shrink",
    "width_importance",
]
