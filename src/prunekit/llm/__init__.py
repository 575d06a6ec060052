"""One-shot pruning of large language models, block by block on calibration data.

    import prunekit as pk
    report = pk.llm.prune(model, calibration_ids, method="wanda", sparsity=0.5)
    report = pk.llm.prune(model, calibration_ids, method="sparsegpt", sparsity="2:4")
    report = pk.llm.prune(model, calibration_ids, method="wanda", sparsity=0.7,
                          allocation="owl")
    pk.bake(model); model.save_pretrained("pruned")

Modules: :mod:`~prunekit.llm.engine` (the sequential calibration engine),
:mod:`~prunekit.llm.methods` (magnitude / Wanda / SparseGPT per layer),
:mod:`~prunekit.llm.sparsegpt`, :mod:`~prunekit.llm.owl`, :mod:`~prunekit.llm.evaluate`
(perplexity, embedding similarity), :mod:`~prunekit.llm.cli` (``prunekit llm``).
"""

from prunekit.llm.blocks import block_layers, find_blocks
from prunekit.llm.evaluate import embedding_similarity, mean_pooled, perplexity
from prunekit.llm.methods import METHODS
from prunekit.llm.oneshot import ALLOCATIONS, prune
from prunekit.llm.report import LayerRecord, LLMPruneReport
from prunekit.llm.sparsegpt import sparsegpt

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "LLMPruneReport",
    "LayerRecord",
    "block_layers",
    "embedding_similarity",
    "find_blocks",
    "mean_pooled",
    "perplexity",
    "prune",
    "sparsegpt",
]
