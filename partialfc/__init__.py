"""partialfc: a face-recognition trainer built around a model-parallel Partial FC head.

Importing the package does no work: no process group, no device query, and not even
torch until the head is asked for (the data tools start fast).
"""
__version__ = "0.1.0"
__all__ = ["AngularTripletLoss", "CombinedMargin", "PartialFC", "__version__"]


def __getattr__(name):
    if name in ("AngularTripletLoss", "CombinedMargin", "PartialFC"):
        from partialfc import head

        return getattr(head, name)
    raise AttributeError(f"module 'partialfc' has no attribute {name!r}")
