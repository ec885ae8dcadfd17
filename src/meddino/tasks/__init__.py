"""Downstream tasks on a backbone: image classification (:mod:`.classify`), segmentation (:mod:`.seg`) and
surgical phase recognition (:mod:`.phase`); :mod:`.loop` is the kit their fine-tuning loops share.
"""

__all__ = ["classify", "loop", "phase", "seg"]  # subpackages and the loop kit: import the one you need
