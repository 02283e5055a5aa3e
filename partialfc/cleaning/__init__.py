"""Sub-center ArcFace dataset cleaning (DESIGN.md section 6), in three steps.

``embed`` turns every image of a RecordIO set into an L2-normalized embedding (one
process or every torchrun rank), ``select`` decides from those embeddings and the
K >= 2 class centers which records to keep and how to relabel them, and ``write``
produces the cleaned set and its report. ``partialfc.clean`` is the command line that
runs them in that order. Nothing here does work at import time.
"""
