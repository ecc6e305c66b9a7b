"""Scipion protocols of the cryoclass plugin (installed as ``cryoclass_plugin.protocols``)."""
from .protocol_classify3d import ProtCryoClassClassify3D
from .protocol_import import ProtCryoClassImportParticles
from .protocol_select_classes import ProtCryoClassSelectClasses

__all__ = ["ProtCryoClassClassify3D", "ProtCryoClassImportParticles",
           "ProtCryoClassSelectClasses"]
