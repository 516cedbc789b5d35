"""Lightning callbacks: zero-shot evaluation, the frozen-teacher guard and the run checkpoint."""

from distill.callbacks.checkpoint import RunCheckpoint
from distill.callbacks.teacher_guard import TeacherFrozenCheck
from distill.callbacks.zeroshot_callback import ZeroShotEvaluation

__all__ = ["RunCheckpoint", "TeacherFrozenCheck", "ZeroShotEvaluation"]
