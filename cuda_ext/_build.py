"""Lazy build of the C++/CUDA sources in ``csrc/`` with ``torch.utils.cpp_extension.load``.

Nothing is compiled at import or install: the first ``backend="cuda"`` call (or ``auto`` on
CUDA tensors) compiles once per machine into torch's extension cache (about a minute) and
registers ``torch.ops.distill_cuda.*``. The CPU path never needs nvcc.

The fused backend (``backend="cuda_fused"``, ops ``torch.ops.distill_cuda_fused.*``: InfoNCE
tiles kept on chip, the other ops forwarded to ``distill_cuda``) is a second extension, built on
its first use only. Its kernels have not run on a GPU before :data:`FUSED_VERIFIED` is set, so
until then it is refused unless the opt-in environment variable ``DISTILL_FUSED_CUDA=1`` is set
(read at import); with it, ``backend="cuda"`` also uses the fused kernels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import _registry

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("similarity.cpp", "similarity_kd.cpp", "similarity_kernels.cu")
EXTENSION_NAME = "distill_similarity_cuda"
_state: dict[str, object] = {"loaded": False, "error": None}

FUSED_SOURCES = ("similarity_fused.cpp", "similarity_fused.cu")
FUSED_EXTENSION_NAME = "distill_similarity_cuda_fused"
FUSED_ENV = "DISTILL_FUSED_CUDA"
#: Set to True once ``benchmarks/gpu_similarity_check.py`` passed on a GPU with the fused kernels.
FUSED_VERIFIED = False
#: ``DISTILL_FUSED_CUDA=1``: allow ``cuda_fused`` before verification and route ``cuda`` to it.
FUSED_OPT_IN = os.environ.get(FUSED_ENV, "") == "1"
_fused_state: dict[str, object] = {"loaded": False}


def cuda_is_loaded() -> bool:
    """Whether ``torch.ops.distill_cuda`` is registered in this process."""
    return bool(_state["loaded"])


def build_cuda(build_directory: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Compile and load the extension (no GPU needed to compile; set TORCH_CUDA_ARCH_LIST to pick targets).

    Args:
        build_directory: where ninja builds; default: torch's extension cache.
        verbose: print the compiler commands.

    Raises:
        RuntimeError: torch is a CPU-only build, nvcc is not found, or compilation fails.
    """
    if _state["loaded"]:
        return
    _compile("cuda", EXTENSION_NAME, SOURCES, build_directory, verbose)
    _registry.register("distill_cuda")
    _state["loaded"] = True


def build_cuda_fused(build_directory: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Compile and load the fused extension alone (no GPU needed to compile; see :func:`build_cuda`).

    Its ``siglip``/``kd_*``/``topk`` forward to ``distill_cuda`` at call time, so running them also
    needs :func:`build_cuda`; :func:`load_fused` does both.

    Args:
        build_directory: where ninja builds; default: torch's extension cache.
        verbose: print the compiler commands.

    Raises:
        RuntimeError: torch is a CPU-only build, nvcc is not found, or compilation fails.
    """
    if _fused_state["loaded"]:
        return
    _compile("cuda_fused", FUSED_EXTENSION_NAME, FUSED_SOURCES, build_directory, verbose)
    _registry.register("distill_cuda_fused")
    _fused_state["loaded"] = True


def _compile(
    backend: str, name: str, sources: tuple[str, ...], build_directory: str | os.PathLike | None, verbose: bool
) -> None:
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(f"backend {backend!r} cannot be built: this torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError(f"backend {backend!r} cannot be built: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    _fix_cuda_home(cpp_extension)
    if build_directory is not None:
        Path(build_directory).mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=None if build_directory is None else str(build_directory),
        is_python_module=False,
        verbose=verbose,
    )


def _has_cudart(home: Path) -> bool:
    return any((home / sub / "libcudart.so").exists() for sub in ("lib64", "lib"))


def _fix_cuda_home(cpp_extension) -> None:
    """Point torch at a toolkit folder that holds libcudart when its guess does not.

    torch guesses CUDA_HOME as nvcc's grandparent; an nvcc installed as /usr/local/bin/nvcc
    gives /usr/local, where the linker misses -lcudart although /usr/local/cuda has it.
    """
    home = Path(cpp_extension.CUDA_HOME)
    if "CUDA_HOME" in os.environ or _has_cudart(home):
        return
    candidates = [(home / "bin" / "nvcc").resolve().parent.parent, Path("/usr/local/cuda")]
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for cand in candidates:
        if _has_cudart(cand) and (cand / "bin" / "nvcc").exists():
            cpp_extension.CUDA_HOME = str(cand)
            return


def load() -> None:
    """Build/load the extension for ``backend="cuda"``.

    Raises:
        RuntimeError: naming the backend and the reason (no device, no nvcc, build error).
    """
    if _state["loaded"]:
        return
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' is not available: no CUDA device (torch.cuda.is_available() is False)")
    try:
        build_cuda()
    except Exception as err:
        _state["error"] = err
        raise RuntimeError(f"backend='cuda' is not built and building it failed: {err}") from err


def try_load() -> bool:
    """For ``auto``: load the extension if possible; warn once and return False otherwise."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    try:
        load()
    except RuntimeError as err:
        warnings.warn(f"{err}; backend='auto' uses the tiled PyTorch path instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def fused_cuda_is_loaded() -> bool:
    """Whether ``torch.ops.distill_cuda_fused`` is registered in this process."""
    return bool(_fused_state["loaded"])


def check_fused_allowed() -> None:
    """Refuse the fused kernels until they are verified on a GPU (or the user opted in).

    Raises:
        RuntimeError: :data:`FUSED_VERIFIED` is False and ``DISTILL_FUSED_CUDA=1`` was not set.
    """
    if not (FUSED_VERIFIED or FUSED_OPT_IN):
        raise RuntimeError(
            "backend='cuda_fused' has not yet passed benchmarks/gpu_similarity_check.py on a GPU "
            "(cuda_ext._build.FUSED_VERIFIED is False); use backend='cuda', or set DISTILL_FUSED_CUDA=1 "
            "before starting Python to run it anyway"
        )


def load_fused() -> None:
    """Build/load both extensions for ``backend="cuda_fused"`` (the fused one forwards non-InfoNCE ops).

    Raises:
        RuntimeError: not verified and not opted in, no CUDA device, or a build error (naming the backend).
    """
    check_fused_allowed()
    if _fused_state["loaded"] and _state["loaded"]:
        return
    load()
    try:
        build_cuda_fused()
    except Exception as err:
        raise RuntimeError(f"backend='cuda_fused' is not built and building it failed: {err}") from err


load_cuda = load
