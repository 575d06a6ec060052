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
(perplexity, embedding similarity); the command ``prunekit llm`` is :mod:`prunekit.cli_llm`.
"""

from prunekit.llm.evaluate import embedding_similarity, perplexity
from prunekit.llm.oneshot import prune
from prunekit.llm.report import LLMPruneReport

__all__ = ["LLMPruneReport", "embedding_similarity", "perplexity", "prune"]
