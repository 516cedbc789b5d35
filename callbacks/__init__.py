"""Lightning callbacks: zero-shot evaluation, teacher-student diagnostics and plots, the run report, the
frozen-teacher guard, the run checkpoint and PromptSRC's Gaussian prompt averaging."""

from distill.callbacks.checkpoint import RunCheckpoint
from distill.callbacks.diagnostics_callback import TeacherStudentDiagnostics
from distill.callbacks.prompt_averaging import GaussianPromptAveraging
from distill.callbacks.run_report import RunReport
from distill.callbacks.teacher_guard import TeacherFrozenCheck
from distill.callbacks.zeroshot_callback import ZeroShotEvaluation

__all__ = [
    "GaussianPromptAveraging",
    "RunCheckpoint",
    "RunReport",
    "TeacherFrozenCheck",
    "TeacherStudentDiagnostics",
    "ZeroShotEvaluation",
]
