"""Face-recognition backbones, built by name, and the backbone file format.

``build_backbone("iresnet100", embedding_size=512)`` creates a model;
``save_backbone`` / ``load_backbone`` write and read the self-describing file
that eval, export, clean and invert consume. Importing this package builds
nothing: the architectures register themselves on first lookup.
"""
from partialfc.models.inference import load_backbone, save_backbone
from partialfc.models.registry import build_backbone, list_backbones, register_backbone

__all__ = ["build_backbone", "register_backbone", "list_backbones", "save_backbone", "load_backbone"]
