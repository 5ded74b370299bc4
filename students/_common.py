"""The students' shared base, re-exported from :mod:`distill.models.base` (where the
foundation models that teachers load also find it)."""

from distill.models.base import ECGStudentConfig, ECGStudentModel, check_signal, describe_input

__all__ = ["ECGStudentConfig", "ECGStudentModel", "check_signal", "describe_input"]
