"""Concept-erasure workbench: erase concepts from text-to-image diffusion models and see where they go.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> pipe("a red apple", num_inference_steps=20, generator=workbench.seeded(0)).images[0].size
(32, 32)
"""
import logging

__version__ = "0.1.0"


class _QuietTorchvisionFallback(logging.Filter):
    """transformers warns that image processors fall back to PIL without torchvision: that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_QuietTorchvisionFallback())

from .models import build_tiny_sd, build_tiny_sdxl, load  # noqa: E402
from .sampling import generate, seeded  # noqa: E402

__all__ = ["load", "seeded", "generate", "build_tiny_sd", "build_tiny_sdxl"]
