"""Lightning callbacks: zero-shot evaluation, the frozen-teacher guard, the run checkpoint and
PromptSRC's Gaussian prompt averaging."""

from distill.callbacks.checkpoint import RunCheckpoint
from distill.callbacks.prompt_averaging import GaussianPromptAveraging
from distill.callbacks.teacher_guard import TeacherFrozenCheck
from distill.callbacks.zeroshot_callback import ZeroShotEvaluation

__all__ = ["GaussianPromptAveraging", "RunCheckpoint", "TeacherFrozenCheck", "ZeroShotEvaluation"]
