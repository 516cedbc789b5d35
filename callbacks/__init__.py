"""Lightning callbacks: zero-shot evaluation and friends."""

from distill.callbacks.zeroshot_callback import ZeroShotEvaluation

__all__ = ["ZeroShotEvaluation"]
