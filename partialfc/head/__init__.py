"""The math of Partial FC: margins, class sampling, the sharded margin-softmax head, geodesic penalties."""
from partialfc.head.geodesic import AngularTripletLoss, GeodesicPenalties
from partialfc.head.margins import MARGIN_PRESETS, CombinedMargin
from partialfc.head.partial_fc import HEAD_IMPLS, PartialFC

__all__ = ["AngularTripletLoss", "CombinedMargin", "GeodesicPenalties", "MARGIN_PRESETS", "PartialFC", "HEAD_IMPLS"]
