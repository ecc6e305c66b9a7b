"""Scipion viewers of the cryoclass plugin (installed as ``cryoclass_plugin.viewers``)."""
from .viewer_classify3d import CryoClassViewer

__all__ = ["CryoClassViewer"]
