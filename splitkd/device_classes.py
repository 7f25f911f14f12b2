"""Device classes: devices of one class share one student architecture in a cohort.

A device's class follows from the memory in its device profile
(``splitkd/profiles/devices.json``): boards under 1 GiB (a Raspberry Pi Zero 2 W)
get a smaller student than the rest. Knowledge moves between classes only
through the server model (KOALA's heterogeneous mode).
"""

from __future__ import annotations

from splitkd import energy
from splitkd.errors import FailedPrecondition
from splitkd.models.spec import ModelSpec

STANDARD = "standard"
TINY = "tiny"
CLASSES = (TINY, STANDARD)
# Below this much memory a device trains the smaller student.
TINY_MEMORY_BYTES = 1 << 30


def device_class(profile_name: str) -> str:
    """The class of a device profile; no profile means a standard device."""
    if not profile_name:
        return STANDARD
    try:
        profile = energy.device_profile(profile_name)
    except Exception as exc:  # an unknown name: say which ones exist
        raise FailedPrecondition(f"cannot place the device in a class: {exc}") from None
    return TINY if profile.memory_bytes < TINY_MEMORY_BYTES else STANDARD


def student_for(device_class_name: str, standard: ModelSpec) -> ModelSpec:
    """The default student of a class: the standard student, halved for tiny devices."""
    if device_class_name == STANDARD:
        return standard
    return ModelSpec(
        standard.family,
        standard.input_shape,
        standard.num_classes,
        widths=tuple(max(1, w // 2) for w in standard.widths),
        hidden=tuple(max(1, w // 2) for w in standard.hidden),
    )
