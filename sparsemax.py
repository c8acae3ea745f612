"""Sparsemax, where the paper's code has it (`from sparsemax import Sparsemax`); it lives in humelib/sparsemax.py."""
from humelib.sparsemax import Sparsemax, sparsemax

__all__ = ["Sparsemax", "sparsemax"]
