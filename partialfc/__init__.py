"""partialfc: a face-recognition trainer built around a model-parallel Partial FC head.

Importing the package does no work: no process group, no device query.
"""
from partialfc.head import CombinedMargin, PartialFC

__version__ = "0.1.0"
__all__ = ["CombinedMargin", "PartialFC", "__version__"]
