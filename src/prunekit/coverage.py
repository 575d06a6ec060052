"""What a prune covers and a count counts: every prunable layer but the two ends of the
network that prunekit keeps dense by default, the embeddings and the output layer; and
:func:`sparsity`, the count over that same selection.

The input embeddings and the output layer (the classifier, a language model's ``lm_head``)
hold a small share of the weights and are the most sensitive to pruning: Frankle & Carbin
(2019) prune the output layer at half the rate of the others, and Wanda (Sun et al. 2023)
and SparseGPT (Frantar & Alistarh 2023) leave embeddings and head dense. So
:func:`prunekit.prune`, :func:`prunekit.pruning.plan`, :class:`~prunekit.Pruner`, the
pipelines built on them (iterative pruning, the lottery ticket), the CLI, the recipes and
:func:`prunekit.sparsity` leave them out unless ``include_output=True`` /
``include_embeddings=True``, and their reports say so.

Which layers those are:

* embeddings: every ``nn.Embedding`` / ``nn.EmbeddingBag``, and the module
  ``model.get_input_embeddings()`` returns when the model has that method (transformers);
* the output layer: the module ``model.get_output_embeddings()`` returns when the model has
  that method and it returns a module (``lm_head``), else the LAST prunable layer in
  ``model.named_modules()`` order. That is registration order, not the order of the
  forward pass: a model that registers its head before its body, or that has several heads,
  gets the wrong layer (or one of them) kept dense; name the layers yourself then
  (``layers=`` / ``exclude=``, with ``include_output=True``). A model with a single prunable
  layer has no separate output layer: that layer is pruned;
* tied weights: a layer that shares its weight tensor with one kept dense stays dense with
  it (one tensor, one mask): a tied ``lm_head`` (``lm_head.weight is
  embed_tokens.weight``) and its embedding are pruned only when both flags are set.

The reports list what they leave out and why (:attr:`PruneReport.skipped
<prunekit.pruning.PruneReport>`, :attr:`SparsityReport.skipped`), in words such as
``not counted: fc3 (output layer; include_output=True prunes it)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from rich.table import Table
from torch import Tensor, nn

from prunekit.errors import NoLayersError
from prunekit.layers import Layer, Selector, is_prunable, require_model, select_layers
from prunekit.spec import boolean, checked

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


OUTPUT, EMBEDDING = "output layer", "embedding"
FIXES = {OUTPUT: "include_output=True", EMBEDDING: "include_embeddings=True"}


@dataclass(frozen=True)
class Dense:
    """Why the default selection keeps one layer dense: ``what`` it is (``"output layer"``,
    ``"embedding"``, or what its weight is tied to) and the ``fix`` that prunes it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}; {self.fix} {'prune' if ' and ' in self.fix else 'prunes'} it"

    @property
    def role(self) -> str:
        """``the output layer``, ``an embedding`` or ``a layer`` (tied to one of those)."""
        article = {"output": "the", "embedding": "an"}.get(self.what.split()[0], "a")
        return f"{article} {self.what}"


def _hf_module(model: nn.Module, method: str) -> nn.Module | None:
    """``model.<method>()`` when the model has it and it returns a module, else None."""
    get = getattr(model, method, None)
    if not callable(get):
        return None
    try:
        found = get()
    except (NotImplementedError, AttributeError):  # transformers' base classes raise these
        return None
    return found if isinstance(found, nn.Module) else None


def _weight(module: nn.Module) -> Tensor | None:
    """The stored weight tensor (a mask's original), for telling tied weights apart."""
    chains = getattr(module, "parametrizations", None)
    if chains is not None and "weight" in chains and hasattr(chains.weight, "original"):
        return chains.weight.original
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _output(model: nn.Module, prunable: list[Layer]) -> Layer | None:
    """The output layer (see the module docstring); None for a single-layer model."""
    if len(prunable) < 2:
        return None
    head = _hf_module(model, "get_output_embeddings")
    if head is None:
        return prunable[-1]
    return next((ly for ly in prunable if ly.module is head), None)


def output_layer(model: nn.Module) -> str | None:
    """The name of ``model``'s output layer (see the module docstring); None for a model
    with fewer than two prunable layers or whose ``get_output_embeddings()`` is not one."""
    output = _output(model, [Layer(n, m) for n, m in model.named_modules() if is_prunable(m)])
    return None if output is None else output.name


def _roles(model: nn.Module, prunable: list[Layer]) -> dict[str, str]:
    """``{layer name: OUTPUT or EMBEDDING}`` (see the module docstring)."""
    inputs = _hf_module(model, "get_input_embeddings")
    roles = {ly.name: EMBEDDING for ly in prunable
             if isinstance(ly.module, EMBEDDINGS) or ly.module is inputs}  # fmt: skip
    output = _output(model, prunable)
    if output is not None:
        roles[output.name] = OUTPUT
    return roles


def kept_dense(
    model: nn.Module, include_output: bool = False, include_embeddings: bool = False
) -> dict[str, Dense]:
    """``{layer name: why}`` for each prunable layer of ``model`` that the default
    selection keeps dense under these flags, in ``named_modules()`` order. A layer holding
    the same weight tensor as one kept dense (tied weights) is kept dense with it."""
    prunable = [Layer(n, m) for n, m in model.named_modules() if is_prunable(m)]
    roles = _roles(model, prunable)
    included = {OUTPUT: include_output, EMBEDDING: include_embeddings}
    tensors: dict[int, list[str]] = {}
    for ly in prunable:
        weight = _weight(ly.module)
        tensors.setdefault(id(ly.module if weight is None else weight), []).append(ly.name)
    out = {}
    for names in tensors.values():
        if all(n not in roles or included[roles[n]] for n in names):
            continue
        fix = " and ".join(dict.fromkeys(FIXES[roles[n]] for n in names if n in roles))
        for name in names:
            tied = [f"{roles.get(n, 'layer')} {n!r}" for n in names if n != name]
            what = roles.get(name, "layer") + (f" tied to {', '.join(tied)}" if tied else "")
            out[name] = Dense(what, fix)
    return {ly.name: out[ly.name] for ly in prunable if ly.name in out}


def select(
    model: nn.Module,
    layers: Selector = None,
    exclude: Selector = None,
    *,
    include_output: bool = False,
    include_embeddings: bool = False,
) -> tuple[list[Layer], dict[str, Dense]]:
    """The layers a prune (or a count) covers: :func:`~prunekit.layers.select_layers`
    without the layers :func:`kept_dense` keeps dense, and those layers with the reason.

    Raises:
        NoLayersError: when every selected layer is kept dense by default (naming them and
            the flag that includes them), or from :func:`~prunekit.layers.select_layers`.
    """
    chosen = select_layers(model, layers, exclude)
    dense = kept_dense(model, include_output, include_embeddings)
    covered = [ly for ly in chosen if ly.name not in dense]
    if not covered:
        named = "; ".join(f"layer {ly.name!r} is kept dense by default as {dense[ly.name].role}"
                          for ly in chosen)  # fmt: skip
        fixes = " / ".join(dict.fromkeys(dense[ly.name].fix for ly in chosen))
        raise NoLayersError(
            f"nothing to prune in layers={layers!r} exclude={exclude!r}: {named}; Fix: "
            f"{fixes}, or select other layers."
        )
    return covered, {ly.name: dense[ly.name] for ly in chosen if ly.name in dense}


def not_counted(skipped: Iterable[tuple[str, str]]) -> str | None:
    """``not counted: fc3 (output layer; include_output=True prunes it), ...``: the line a
    report prints under its table for the layers it neither pruned nor counted."""
    parts = [f"{name} ({reason})" for name, reason in skipped]
    return f"not counted: {', '.join(parts)}" if parts else None


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one layer's effective weight."""

    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and total sparsity of a model's prunable weights: the ``layers`` counted,
    and the ``skipped`` ones (kept dense by default, see :mod:`prunekit.coverage`) with why."""

    layers: list[LayerSparsity] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def total(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> float:
        for row in self.layers:
            if row.name == name:
                return row.sparsity
        raise KeyError(name)

    def to_dict(self) -> dict[str, float]:
        return {**{r.name: r.sparsity for r in self.layers}, "total": self.total}

    def __rich__(self) -> Table:
        table = Table(title="weight sparsity", caption=not_counted(self.skipped.items()),
                      caption_justify="left")  # fmt: skip
        for col in ("layer", "weights", "zeros", "sparsity"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in self.layers:
            table.add_row(r.name, f"{r.numel:,}", f"{r.zeros:,}", f"{r.sparsity:.2%}")
        table.add_row("total", f"{self.numel:,}", f"{self.zeros:,}", f"{self.total:.2%}")
        return table


def _layer_sparsity(layer: Layer) -> LayerSparsity:
    with torch.no_grad():
        weight = layer.module.weight
        return LayerSparsity(
            layer.name, weight.numel(), int(weight.numel() - weight.count_nonzero())
        )


def sparsity(
    model: nn.Module,
    layers: Selector = None,
    exclude: Selector = None,
    *,
    include_output: bool = False,
    include_embeddings: bool = False,
) -> SparsityReport:
    """Zeros in the effective weights of the prunable layers, per layer and in total.

    Counts actual zeros of ``module.weight`` (masked or baked alike) over the layers a
    prune with the same arguments covers: the output layer and embeddings are left out
    (listed in :attr:`SparsityReport.skipped`) unless ``include_output`` /
    ``include_embeddings``, as for :func:`prunekit.prune` and :func:`prunekit.llm.prune`.
    """
    for name, flag in (("include_output", include_output),
                       ("include_embeddings", include_embeddings)):  # fmt: skip
        checked("pk.sparsity", name, flag, boolean())
    chosen, dense = select(require_model(model, real=True), layers, exclude,
                                include_output=include_output,
                                include_embeddings=include_embeddings)  # fmt: skip
    return SparsityReport([_layer_sparsity(ly) for ly in chosen],
                          {name: str(why) for name, why in dense.items()})  # fmt: skip
