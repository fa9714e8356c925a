"""Position schemes, the ``position`` config group: which ids a model sees and how they rotate.

Members (config option: class): ``rope``: Rope, ``pi``: LinearPI, ``ntk``: NTKAware,
``dynamic_ntk``: DynamicNTK, ``yarn``: YaRN, ``pose``: PoSE, ``crd_ntk``: CRDNTK,
``selected``: Selected. ``ctxlab.position.callbacks.NTKGrowth`` drives CRD NTK's growing scale;
a scheme's ``growth_callback()`` returns it where needed (imported lazily, so that this package
does not import Lightning).
"""

from ctxlab.position.base import MAX_EXACT_POSITION, PositionScheme, ntk_base
from ctxlab.position.crd_ntk import CRDNTK
from ctxlab.position.interpolation import DynamicNTK, LinearPI, NTKAware, YaRN
from ctxlab.position.pose import PoSE
from ctxlab.position.rope import Rope, Selected

__all__ = [
    "MAX_EXACT_POSITION",
    "CRDNTK",
    "DynamicNTK",
    "LinearPI",
    "NTKAware",
    "PoSE",
    "PositionScheme",
    "Rope",
    "Selected",
    "YaRN",
    "ntk_base",
]
