"""Input checks shared by every backend: clear errors that name the offending tensor."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(
    named: dict[str, torch.Tensor], *, same_width: tuple[tuple[str, str], ...] = (), check_finite: bool = True
) -> None:
    """Validate 2-D embedding tensors that go into one op.

    Args:
        named: ``{name: (rows, D) tensor}`` in the order they appear in the op's signature.
        same_width: pairs of names whose last dimensions must be equal (the pairs that are multiplied).
        check_finite: also reject NaN/inf: one reduction per tensor and a single host sync for all
            of them; the offending tensor is found (and named) only when the check fails.

    Raises:
        TypeError: a value is not a floating tensor, or dtypes/devices are mixed.
        ValueError: wrong rank, empty, mismatched widths, or non-finite values.
    """
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != first.device:
            raise TypeError(f"{name} is on {t.device} but {first_name} is on {first.device}: move both to one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: cast both to one dtype")
    for a, b in same_width:
        if named[a].shape[1] != named[b].shape[1]:
            raise ValueError(
                f"embedding widths differ ({a} has D={named[a].shape[1]}, {b} has D={named[b].shape[1]}); "
                "the similarity needs equal D"
            )
    # Value checks need a host sync; under torch.compile they would break the graph, so skip them.
    if check_finite and not torch.compiler.is_compiling():
        finite = {name: torch.isfinite(t).all() for name, t in named.items()}
        if not bool(torch.stack(list(finite.values())).all()):
            bad = next(name for name, ok in finite.items() if not bool(ok))
            raise ValueError(f"{bad} contains non-finite values (NaN or inf)")


def as_scalar(value: float | torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    """Return ``value`` as a 0-d tensor on ``like``'s device (keeps autograd history).

    A non-finite scale is not rejected: it yields a non-finite loss, which the training loop's
    ``weighted_sum`` reports by objective name (a learnable scale can diverge mid-run).

    Raises:
        ValueError: if it has more than one element.
        TypeError: if a tensor value lives on another (non-CPU) device.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.device != like.device and value.device.type != "cpu":
            raise TypeError(f"{name} is on {value.device} but the embeddings are on {like.device}")
        t = value.reshape(()).to(device=like.device)
    else:
        t = torch.tensor(float(value), device=like.device)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def check_offset(offset: int, n: int, m: int) -> None:
    """Positives sit at (i, i + offset) for i < n; they must fit in the m columns."""
    if offset < 0 or n + offset > m:
        raise ValueError(
            f"positives at (i, i + offset) need 0 <= offset and N + offset <= M; got N={n}, M={m}, offset={offset}"
        )


def check_weights(**weights: float) -> None:
    """Loss weights must be finite and non-negative."""
    for name, w in weights.items():
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"{name} must be finite and >= 0, got {w}")
