"""Evaluation of trained coders: spliced CE/KL, reconstruction metrics, shrinkage, reports."""

from .spliced import CoderEval, evaluate_coders, write_report

__all__ = ["CoderEval", "evaluate_coders", "write_report"]
