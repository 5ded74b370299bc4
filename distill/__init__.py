"""ecg-distill: knowledge distillation and compression of large ECG models."""

__version__ = "0.1.0"
