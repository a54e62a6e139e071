"""Erasure methods. Each returns an :class:`~workbench.edits.Edit` and leaves the pipeline as it was."""
from .fewshot import fewshot
from .rece import rece
from .uce import uce

__all__ = ["uce", "rece", "fewshot"]
