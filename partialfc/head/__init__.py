"""The math of Partial FC: margins, class sampling, the sharded margin-softmax head."""
from partialfc.head.margins import MARGIN_PRESETS, CombinedMargin
from partialfc.head.partial_fc import HEAD_IMPLS, PartialFC

__all__ = ["CombinedMargin", "MARGIN_PRESETS", "PartialFC", "HEAD_IMPLS"]
