"""What every sparse GEMM module shares: the forward around one sparse product, bytes,
printing, state dicts whose sparse buffers take the loaded tensors' sizes, and the checks
a loader runs before trusting a file: spec fields (:func:`check_fields`), tensor dtypes and
shapes (:func:`check_tensor`), compressed-row invariants (:func:`check_compressed_rows`),
and the safetensors files themselves (:func:`write_tensors`, :func:`read_tensors`: atomic,
with a SHA-256 of the tensors in the header)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from reprlib import repr as brief  # values from files can be huge
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from torch import Tensor, nn

from prunekit.errors import CheckpointError, first_line
from prunekit.fsio import atomic_write


def compressed_rows(
    layout: torch.layout,
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    shape: tuple[int, int],
    check_invariants: bool = False,
) -> Tensor:
    """A CSR (``values`` 1-D) or BSR (``values`` 3-D) tensor over existing buffers, no copy,
    by default no invariant check (a few microseconds: cheap enough to rebuild on every
    call; loaders check once, :func:`check_compressed_rows`)."""
    make = torch.sparse_csr_tensor if layout == torch.sparse_csr else torch.sparse_bsr_tensor
    return make(crow, col, values, shape, check_invariants=check_invariants)


def csr_matmul(csr: Tensor, xt: Tensor) -> Tensor:
    """``csr @ xt`` for ``xt`` of shape ``(in, cols)``; one column goes through ``torch.mv``
    (3-5x faster than ``torch.sparse.mm`` with one column on MKL, measured on a Xeon)."""
    if xt.shape[1] == 1:
        return torch.mv(csr, xt[:, 0]).unsqueeze(1)
    return torch.sparse.mm(csr, xt)


# torch warns once per process that sparse CSR is "beta"; spend that warning here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    compressed_rows(
        torch.sparse_csr,
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0),
        (1, 1),
    )

_DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def dtype_from_name(name: str) -> torch.dtype:
    """``torch.float32`` from ``"torch.float32"`` (as written by ``str(dtype)``)."""
    return _DTYPES[name]


MAX_DIM = 2**31 - 1
"""The largest size a loaded spec may name (int32 indices address no more)."""

Check = tuple[Callable[[object], bool], str]
"""A spec field's test, and what it expects (for the error message)."""


def is_size(value: object, low: int = 1) -> bool:
    """An int (not a bool) in ``[low, MAX_DIM]``."""
    return type(value) is int and low <= value <= MAX_DIM


def is_pair(value: object, low: int = 1) -> bool:
    """A list of two :func:`is_size` ints."""
    return isinstance(value, list) and len(value) == 2 and all(is_size(v, low) for v in value)


SIZE: Check = (is_size, f"an int in [1, {MAX_DIM}]")
PAIR: Check = (is_pair, f"a list of two ints in [1, {MAX_DIM}]")
FLAG: Check = (lambda v: isinstance(v, bool), "true or false")
TEXT: Check = (lambda v: isinstance(v, str), "a string")
DTYPE: Check = (lambda v: isinstance(v, str) and v in _DTYPES, f"one of {sorted(_DTYPES)}")


def check_fields(spec: object, fields: Mapping[str, Check]) -> dict[str, Any]:
    """``spec`` if it is a dict with exactly the keys of ``fields``, each passing its check.

    Raises:
        CheckpointError: naming the key and the value.
    """
    if not isinstance(spec, dict):
        raise CheckpointError(f"spec {brief(spec)} is not a JSON object")
    if spec.keys() != fields.keys():
        missing, unknown = sorted(fields.keys() - spec.keys()), sorted(spec.keys() - fields.keys())
        raise CheckpointError(f"spec keys: missing {missing}, unknown {brief(unknown)}")
    for key, (ok, want) in fields.items():
        if not ok(spec[key]):
            raise CheckpointError(f"spec field {key!r} = {brief(spec[key])} is not {want}")
    return spec


def check_tensor(
    state: Mapping[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int | None, ...]
) -> Tensor:
    """``state[key]`` if it has ``dtype`` and ``shape`` (None: any size on that axis).

    Raises:
        CheckpointError: naming the tensor, what it is and what was expected.
    """
    tensor = state[key]
    sizes = tensor.dim() == len(shape) and all(
        want is None or want == size for want, size in zip(shape, tensor.shape, strict=True)
    )
    if tensor.dtype != dtype or not sizes:
        want = ", ".join("any" if w is None else str(w) for w in shape)
        raise CheckpointError(
            f"tensor {key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected "
            f"{dtype} of shape ({want})"
        )
    return tensor


def check_compressed_rows(
    layout: torch.layout, crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]
) -> None:
    """Refuse CSR / BSR indices no kernel may read: row pointers not starting at 0, not
    non-decreasing, not ending at the number of values or not one per (block) row plus
    one; column indices outside ``[0, cols)`` or not sorted and distinct in every row
    (torch's own validator, ``check_invariants=True``; it only reads the indices).

    Raises:
        CheckpointError: naming the broken invariant.
    """
    try:
        compressed_rows(layout, crow, col, values, shape, check_invariants=True)
    except RuntimeError as err:
        raise CheckpointError(f"indices break the {layout} invariants: {first_line(err)}") from err


_DIGEST = "prunekit.sha256"


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of ``tensors``: every name, dtype, shape and byte, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_tensors(path: str | Path, tensors: dict[str, Tensor], key: str, header: object) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically
    (:func:`prunekit.fsio.atomic_write`), ``header`` as JSON under ``key`` in its metadata,
    beside the :func:`tensors_digest`.

    Raises:
        CheckpointError: the file cannot be written (it is then left as it was).
    """
    metadata = {key: json.dumps(header), _DIGEST: tensors_digest(tensors)}
    atomic_write(Path(path), serialize(tensors, metadata=metadata))


def read_tensors(path: str | Path, key: str, writer: str) -> tuple[Any, dict[str, Tensor]]:
    """The JSON header under ``key`` and the tensors of a file :func:`write_tensors` wrote
    (``writer`` names the public save, for the fix). Safetensors only: nothing is
    unpickled. A file without a digest (saved before digests existed) is accepted; its
    contents are still checked by the caller.

    Raises:
        CheckpointError: the file cannot be read, is not safetensors or is truncated, has
            no ``key`` header, one that is not JSON, or other header entries than ``key``
            and the digest, or its tensors do not match the digest.
    """
    name = str(path)
    fix = f"Fix: pass a file written by {writer} (save it again if it was cut or corrupted)."
    try:
        with safe_open(name, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(name)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(
            f"cannot read {name!r} as safetensors ({type(err).__name__}: {first_line(err)}); {fix}"
        ) from err
    if key not in metadata:
        raise CheckpointError(f"{name!r} has no {key!r} header; {fix}")
    unknown = sorted(metadata.keys() - {key, _DIGEST})
    if unknown:  # e.g. the digest's own name damaged: it must not pass as a file without one
        raise CheckpointError(f"{name!r} has unknown header entries {brief(unknown)}; {fix}")
    if _DIGEST in metadata and metadata[_DIGEST] != tensors_digest(tensors):
        raise CheckpointError(
            f"{name!r}: its tensors do not match the SHA-256 in its header (the file was "
            f"corrupted or edited); {fix}"
        )
    try:
        return json.loads(metadata[key]), tensors
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{name!r}: its {key!r} header is not JSON ({err}); {fix}") from err


class SparseLinear(nn.Module):
    """``y = x W^T + b`` where a subclass stores ``W`` (``out x in``) in a sparse format.

    Subclasses hold a ``values`` buffer and implement :meth:`matmul` (``W @ xt`` for
    ``xt`` of shape ``(in, cols)``), :meth:`to_dense`, :meth:`spec` and :meth:`from_spec`.
    Every tensor is a buffer, so ``state_dict`` / ``load_state_dict`` / ``.to()`` work;
    loading resizes the buffers to the incoming tensors (nonzero counts vary).
    """

    format: str = "sparse"
    SPEC_FIELDS: ClassVar[dict[str, Check]] = {
        "format": TEXT, "in_features": SIZE, "out_features": SIZE, "bias": FLAG, "dtype": DTYPE,
    }  # fmt: skip

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)

    def matmul(self, xt: Tensor) -> Tensor:
        """``W @ xt``: ``(in, cols) -> (out, cols)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The ``(out, in)`` weight this module multiplies by."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments; :meth:`from_spec` rebuilds an empty module."""
        return {
            "format": self.format,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.dtype),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SparseLinear:
        raise NotImplementedError

    @classmethod
    def check_spec(cls, spec: object) -> dict[str, Any]:
        """``spec`` if :meth:`spec` could have written it (checked before :meth:`from_spec`).

        Raises:
            CheckpointError: naming the field and the value.
        """
        return check_fields(spec, cls.SPEC_FIELDS)

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """Refuse incoming tensors (this module's ``state_dict`` keys, as the caller checked)
        whose dtype, shape or indices this module, built by :meth:`from_spec`, cannot run
        safely; subclasses add their format's invariants.

        Raises:
            CheckpointError: naming the tensor and what is wrong.
        """
        if self.bias is not None:
            check_tensor(state, "bias", self.dtype, (self.out_features,))

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the stored values (every subclass has a ``values`` buffer)."""
        return self.values.dtype

    def dense_nbytes(self) -> int:
        """Bytes of the same weight and bias stored densely."""
        numel = self.in_features * self.out_features
        numel += 0 if self.bias is None else self.bias.numel()
        return numel * self.values.element_size()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.matmul(flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes of the stored weight and bias (persistent buffers only)."""
        persistent = (n for n in self._buffers if n not in self._non_persistent_buffers_set)
        return sum(
            b.numel() * b.element_size()
            for b in (self._buffers[n] for n in persistent)
            if b is not None
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty(
                    incoming.shape, dtype=buf.dtype, device=buf.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.describe()}, "
            f"bytes={self.nbytes():,} ({self.nbytes() / self.dense_nbytes():.3f}x dense)"
        )

    def describe(self) -> str:
        """Format-specific part of ``repr``."""
        return ""
