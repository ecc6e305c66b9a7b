"""Scipion protocols of the cryoclass plugin (installed as ``cryoclass_plugin.protocols``)."""
