"""Lightning callbacks: zero-shot evaluation and the frozen-teacher guard."""

from distill.callbacks.teacher_guard import TeacherFrozenCheck
from distill.callbacks.zeroshot_callback import ZeroShotEvaluation

__all__ = ["TeacherFrozenCheck", "ZeroShotEvaluation"]
