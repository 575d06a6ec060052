"""``pk.llm.prune``: one-shot, calibration-based pruning of a transformer, block by block."""

from __future__ import annotations

import time

import torch
from torch import nn

from prunekit.criteria.activation import wanda_scores
from prunekit.errors import IncompatibleLayerError, PruningError, UnknownChoiceError
from prunekit.granularity import NM
from prunekit.inputs import eval_mode
from prunekit.layers import (
    Layer,
    check_weight,
    require_unique_modules,
    skipped_tensors,
    to_canonical,
)
from prunekit.llm.accelerated import OffloadedBlocks, check_offloaded, check_offloaded_values
from prunekit.llm.arguments import PruneArguments
from prunekit.llm.blocks import block_layers, find_blocks
from prunekit.llm.calibration import Batch, TokenData, calibration_batches, real_tokens
from prunekit.llm.engine import (
    BlockInputs,
    BlockStream,
    LayerStats,
    capture_inputs,
    sequential,
)
from prunekit.llm.experts import PARAMS, find_experts
from prunekit.llm.memory import PeakMemory
from prunekit.llm.methods import (
    Method,
    Target,
    describe,
    method_name,
    needs,
    parse_method,
    parse_target,
    prune_layer,
)
from prunekit.llm.moe import check_experts, prune_experts, zeros_fraction
from prunekit.llm.owl import outlier_ratio, owl_sparsities
from prunekit.llm.placement import execution_device, offloading_hooks
from prunekit.llm.report import LayerRecord, LLMPruneReport, block_records
from prunekit.masks import bake, kept_fraction, mask_param, require_bakeable, tie_masks

ALLOCATIONS = ["uniform", "owl"]
NAN = float("nan")  # the error of a layer when ``measure_error=False``


def _check_layers(
    blocks: nn.ModuleList, prefix: str, target: Target, *, loaded_later: bool = False
) -> None:
    """Every block layer prunable at ``target``; ``loaded_later``: a weight on the meta
    device is offloaded, its values checked by :func:`.check_offloaded_values`."""
    layers = [ly for i, b in enumerate(blocks) for ly in block_layers(b, f"{prefix}.{i}")]
    require_unique_modules(layers)
    for layer in layers:
        if not (loaded_later and layer.weight.is_meta):
            check_weight(layer)
        if isinstance(target, NM) and (reason := target.incompatibility(layer)):
            raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}")
    for i, block in enumerate(blocks):
        for ex in find_experts(block, f"{prefix}.{i}"):
            if not (loaded_later and any(p.is_meta for p in ex.module.parameters())):
                check_experts(ex, target)


def _owl_targets(
    blocks: nn.ModuleList,
    prefix: str,
    inputs: BlockInputs,
    sparsity: float,
    args: PruneArguments,
) -> list[float]:
    """Per-block OWL sparsities from a statistics-only pass over the dense blocks."""
    ratios: list[float] = []

    def visit(index: int, layers: list[Layer], stats: dict[str, LayerStats]) -> bool:
        scores = [
            wanda_scores(to_canonical(ly.module, ly.module.weight), stats[ly.name].norms.norms)
            for ly in layers
        ]
        ratios.append(outlier_ratio(scores, args.owl_m))
        return False

    sequential(
        blocks,
        prefix,
        inputs,
        visit,
        needs=frozenset({"norms"}),
        description="OWL outlier ratios",
        progress=args.progress,
        measure=False,
        prunes=False,
    )
    return owl_sparsities(ratios, sparsity, args.owl_lambda)


def check_target(sparsity: float | str, allocation: str) -> Target:
    """The parsed target, with the allocation checked against it."""
    target = parse_target(sparsity)
    if allocation not in ALLOCATIONS:
        raise UnknownChoiceError("allocation", allocation, ALLOCATIONS)
    if allocation == "owl" and isinstance(target, NM):
        raise PruningError(
            f"allocation 'owl' varies sparsity per block, which N:M ({target.name}) fixes; "
            "Fix: use a fractional sparsity with OWL, or allocation='uniform'."
        )
    return target


def prune(
    model: nn.Module,
    calibration: TokenData,
    *,
    method: Method = "wanda",
    sparsity: float | str = 0.5,
    allocation: str = "uniform",
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    keep_masks: bool = False,
    measure_error: bool = True,
) -> LLMPruneReport:
    """Prune every Linear / Conv1D of a transformer's blocks, one block at a time.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Qwen2, OPT, GPT-2...) or encoder
            (BERT, MiniLM...), or any model whose forward runs an ``nn.ModuleList`` of blocks.
            Embeddings and the LM head stay dense. Fused MoE experts (Mixtral, Qwen2-MoE,
            Qwen3-MoE in transformers 5) are pruned expert by expert on the tokens routed
            to each (:mod:`prunekit.llm.moe`; always baked); routers stay dense.
            Blocks accelerate offloads (``device_map`` with an ``offload_folder``) are
            loaded one at a time and written back to the offload folder, all or nothing
            (:mod:`prunekit.llm.accelerated`; not with ``keep_masks`` or OWL).
        calibration: token ids ``(samples, seq_len)``, a list of id tensors / tokenizer
            dicts (one batch each), or a :class:`~prunekit.inputs.Calibration` of them.
            The papers use 128 samples of 2048 tokens.
        method: ``"magnitude"`` (one threshold per layer), ``"wanda"`` (``|W| * ||X||``
            per output row, Sun et al. 2023), ``"sparsegpt"`` (OBS sweep with weight
            updates, Frantar & Alistarh 2023), or any criterion that scores rows (a name
            or a :class:`~prunekit.criteria.Criterion`, compared within each output row);
            see :mod:`prunekit.llm.methods`.
        sparsity: a fraction in [0, 1) or an N:M pattern ``"2:4"`` / ``"4:8"``.
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"`` (Yin et al.
            2024: per-block sparsity from outlier ratios, ``owl_m`` and ``owl_lambda``; see
            :mod:`prunekit.llm.owl`). Not with N:M.
        blocks: qualified name of the block list, when automatic detection picks wrong.
        batch_size: calibration rows per forward when ``calibration`` is one tensor.
        progress: show a progress bar per block.
        keep_masks: False (default): the zeros are baked into the weights of the blocks
            (:func:`prunekit.bake`), so ``model.state_dict()`` holds ordinary weights and
            ``model.save_pretrained`` / ``from_pretrained`` round-trip the pruned model.
            True: the masks stay registered (``pk.masks.remove`` restores Wanda /
            magnitude weights; masked fine-tuning keeps the zeros); then call
            ``pk.bake(model)`` before ``save_pretrained``, which otherwise writes
            parametrization keys that ``from_pretrained`` ignores, re-initialising every
            pruned weight at random.
        measure_error: True (default): each layer's relative output error is measured on
            the block's inputs (a second forward of each block). For SparseGPT / ALPS this
            keeps the block's dense weights until it is measured (one block's worth of
            memory); False skips it (``error`` is NaN in the report) for the lowest peak.

    Returns:
        An :class:`LLMPruneReport`: per-layer (and per-expert) sparsity and error, per
        block what was pruned and what was left dense (``blocks``; ``block_table()``), the
        weight tensors in the blocks that are no layer's (``skipped``: routers, experts in
        a layout :mod:`prunekit.llm.experts` does not read) and ``notes`` (experts that got
        no calibration token and fell back to magnitude). SparseGPT
        *overwrites the kept weights* with their compensated values, so even with
        ``keep_masks=True`` the dense model cannot be restored: copy it first if you need it.

    Raises:
        UsageError: ``owl_m`` not a finite real > 0, ``owl_lambda`` not one in [0, 0.5),
            ``blocks`` neither None nor a string, ``batch_size`` not an int in 1..2**31,
            ``progress`` / ``keep_masks`` not bools (:mod:`prunekit.llm.arguments`).
        PruningError: subclasses for a bad method, sparsity, allocation, calibration,
            N:M not dividing a layer's input size, or blocks that cannot be found; all are
            checked before the model is touched.

    Example:
        >>> report = pk.llm.prune(model, ids[:128, :256], method="wanda", sparsity=0.5)
        >>> model.save_pretrained("pruned")  # ordinary weights, zeros baked in
    """
    args = PruneArguments(owl_m, owl_lambda, blocks, batch_size, progress, keep_masks)
    method = parse_method(method)
    target = check_target(sparsity, allocation)
    prefix, block_list = find_blocks(model, args.blocks)
    offloaded = bool(offloading_hooks(block_list))
    if offloaded:
        check_offloaded(args.keep_masks, allocation)
    _check_layers(block_list, prefix, target, loaded_later=offloaded)
    if not args.keep_masks:
        require_bakeable(block_list, prefix)
    batches = calibration_batches(calibration, model, args.batch_size)
    if not offloaded:
        return run_prune(model, batches, method, target, allocation, args, measure=measure_error)
    check_offloaded_values(block_list, prefix, target)  # the values read: the last check
    stream = OffloadedBlocks()
    try:
        report = run_prune(
            model, batches, method, target, allocation, args, stream, measure=measure_error
        )
        stream.commit()
    except BaseException:
        stream.rollback()
        raise
    return report


def run_prune(
    model: nn.Module,
    batches: list[Batch],
    method: Method,
    target: Target,
    allocation: str,
    args: PruneArguments,
    stream: BlockStream | None = None,
    *,
    measure: bool = True,
) -> LLMPruneReport:
    """The pass of :func:`prune` on its checked arguments. With ``stream`` (out of core:
    :mod:`prunekit.llm.offload`; uniform allocation) each block is recorded, then baked
    unless ``keep_masks``, as it finishes, before the stream takes its weights back.
    ``measure``: :func:`prune`'s ``measure_error``."""
    prefix, block_list = find_blocks(model, args.blocks)
    device = execution_device(model)
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad(), PeakMemory(device) as peak:
        inputs = capture_inputs(model, block_list[0], batches)
        block_targets: list[Target] = [target] * len(block_list)
        if allocation == "owl":
            block_targets = _owl_targets(block_list, prefix, inputs, float(target), args)

        early = not args.keep_masks and (not measure or "hessian" in needs(method))
        visit = _Visit(method, block_list, prefix, block_targets, early, alone=not measure)
        finishing = None if stream is None else _Finishing(stream, visit, args, measure)
        errors = sequential(
            block_list,
            prefix,
            inputs,
            visit,
            needs=needs(method),
            description=f"{method_name(method)} {describe(target)}",
            progress=args.progress,
            measure=measure,
            stream=finishing,
            consume=True,  # the OWL pass is done: the captured states can go
        )
    if finishing is None:
        records = _records(block_list, visit, errors if measure else None)
        tie_masks(model)
        if not args.keep_masks:
            _bake_blocks(model, block_list)
    else:
        records = finishing.records
    return LLMPruneReport(
        method_name(method),
        describe(target),
        allocation,
        sum(len(b["input_ids"]) for b in batches),
        sum(real_tokens(b) for b in batches),
        records,
        time.perf_counter() - start,
        peak.bytes,
        peak.source,
        *_skipped(block_list, prefix),
        blocks=block_records(block_list, prefix, records),
        notes=visit.notes,
    )


class _Visit:
    """Prunes block ``index``'s layers and fused experts (the ``visit`` of
    :func:`prunekit.llm.engine.sequential`). ``early``: the block is baked at once, before
    the pass that computes its outputs, so that forward reads plain weights (no
    weight-sized ``original * mask`` per call); its sparsities are read first. (Only when
    no error meter references the weights it zeroes in place; a block weight is never
    tied to another block's, :func:`~prunekit.layers.require_unique_modules`, and one
    tied to a tensor outside the blocks gets the same zeros as from a tied mask.)
    ``alone``: no error meter references the dense weights, so SparseGPT may sweep them
    in place (:func:`~prunekit.llm.methods.prune_layer`)."""

    def __init__(
        self,
        method: Method,
        block_list: nn.ModuleList,
        prefix: str,
        targets: list[Target],
        early: bool,
        alone: bool = False,
    ) -> None:
        self.method, self.block_list, self.prefix = method, block_list, prefix
        self.targets, self.early, self.alone = targets, early, alone
        self.notes: list[tuple[str, str]] = []
        self.sparsity: dict[str, float] = {}

    def __call__(self, index: int, layers: list[Layer], stats: dict[str, LayerStats]) -> bool:
        target, block = self.targets[index], self.block_list[index]
        for layer in layers:  # each layer's statistics freed once it is pruned
            prune_layer(self.method, layer, target, stats.pop(layer.name), in_place=self.alone)
        experts = find_experts(block, f"{self.prefix}.{index}")
        self.notes.extend(prune_experts(self.method, experts, target, stats))
        if self.early:
            self.sparsity |= {ly.name: 1.0 - kept_fraction(ly.module) for ly in layers}
            bake(block)
        return True


def _bake_blocks(model: nn.Module, block_list: nn.ModuleList) -> None:
    """Bake the blocks' masks, and the ones :func:`~prunekit.masks.tie_masks` gave modules
    outside the blocks that hold one of their tensors (its zeros are then in the shared
    tensor already): every path leaves plain weights, still tied, as an early bake does."""
    blocks = [m for m in block_list.modules() if mask_param(m) is not None]
    originals = {id(m.parametrizations.weight.original) for m in blocks}
    bake(block_list)
    for module in model.modules():
        tied = mask_param(module) is not None
        if tied and id(module.parametrizations.weight.original) in originals:
            bake(module)


class _Finishing:
    """Wraps a :class:`BlockStream`: each finished block's records, then its masks baked."""

    def __init__(
        self, inner: BlockStream, visit: _Visit, args: PruneArguments, measure: bool
    ) -> None:
        self.inner, self.visit, self.args, self.measure = inner, visit, args, measure
        self.records: list[LayerRecord] = []

    def load(self, index: int, block: nn.Module) -> None:
        self.inner.load(index, block)

    def done(
        self, index: int, block: nn.Module, errors: dict[str, float], inputs: BlockInputs
    ) -> None:
        self.records += _block_records(block, index, self.visit, errors if self.measure else None)
        if not self.args.keep_masks:
            bake(block)
        self.inner.done(index, block, errors, inputs)


def _covered(block: nn.Module) -> list[torch.Tensor]:
    """The tensors a prune handles in ``block``: its layers' parameters, fused experts."""
    layers = [p for ly in block_layers(block, "") for p in ly.module.parameters()]
    return layers + [getattr(ex.module, n) for ex in find_experts(block, "") for n in PARAMS]


def _skipped(block_list: nn.ModuleList, prefix: str) -> tuple[list[tuple[str, str]], int]:
    """The weight tensors of the blocks that are no block layer's nor a recognised fused
    expert's (routers, other expert layouts), with the reason, and how many weights."""
    covered = [p for block in block_list for p in _covered(block)]
    found = skipped_tensors(block_list, covered)
    return [(f"{prefix}.{n}", r) for n, r, _ in found], sum(k for _, _, k in found)


def _records(
    block_list: nn.ModuleList, visit: _Visit, errors: dict[str, float] | None
) -> list[LayerRecord]:
    """One record per pruned layer or expert matrix of every block."""
    return [
        record
        for index, block in enumerate(block_list)
        for record in _block_records(block, index, visit, errors)
    ]


def _block_records(
    block: nn.Module, index: int, visit: _Visit, errors: dict[str, float] | None
) -> list[LayerRecord]:
    """One record per pruned layer or expert matrix of block ``index``: shape, target,
    sparsity (its mask's, or the one ``visit`` read before baking it), output error
    (``errors`` None: not measured, NaN)."""
    records = []
    name, fraction = f"{visit.prefix}.{index}", _fraction(visit.targets[index])
    for ly in block_layers(block, name):
        shape = tuple(ly.weight.shape)
        sparsity = visit.sparsity.get(ly.name, 1.0 - kept_fraction(ly.module))
        error = NAN if errors is None else errors[ly.name]
        records.append(LayerRecord(ly.name, shape, ly.weight.numel(), fraction, sparsity, error))
    for ex in find_experts(block, name):
        for key, param, e in ex.matrices():
            w, error = param[e].detach(), NAN if errors is None else errors[key]
            records.append(LayerRecord(key, tuple(w.shape), w.numel(), fraction,
                                       zeros_fraction(w), error))  # fmt: skip
    return records


def _fraction(target: Target) -> float:
    return target.sparsity if isinstance(target, NM) else float(target)
