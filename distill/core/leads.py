"""The standard 12-lead order and case-insensitive matching of lead names onto it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from distill.core.errors import DataError

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
NUM_LEADS = len(STANDARD_LEADS)
_INDEX = {name.lower(): i for i, name in enumerate(STANDARD_LEADS)}


def lead_index(name: str) -> int:
    """Index of a lead name in the standard order, matched case-insensitively ("AVR" -> 3)."""
    try:
        return _INDEX[name.strip().lower()]
    except KeyError:
        raise DataError(
            f"unknown lead name {name!r}; expected one of {', '.join(STANDARD_LEADS)}"
        ) from None


def lead_indices(names: Iterable[str] | None) -> tuple[int, ...]:
    """Standard indices of a lead subset (None or "all" -> all 12), refusing duplicates."""
    if names is None or names == "all":
        return tuple(range(NUM_LEADS))
    idx = tuple(lead_index(n) for n in names)
    if len(set(idx)) != len(idx):
        raise DataError(f"duplicate lead in {list(names)}")
    if not idx:
        raise DataError("a lead subset must name at least one lead")
    return idx


def canonical_lead_names(names: Sequence[str] | None) -> tuple[str, ...]:
    """The standard spelling of each name ("avr" -> "aVR"), in the given order."""
    return tuple(STANDARD_LEADS[i] for i in lead_indices(names))


def standard_order(names: Sequence[str], *, source: str = "record") -> list[int]:
    """For each standard lead, its position in ``names`` (a record's own lead order).

    Raises DataError naming ``source`` when a standard lead is missing or an unknown or
    duplicated name appears.
    """
    positions: dict[int, int] = {}
    for pos, name in enumerate(names):
        try:
            i = lead_index(name)
        except DataError:
            raise DataError(f"{source}: unknown lead name {name!r}") from None
        if i in positions:
            raise DataError(f"{source}: lead {STANDARD_LEADS[i]} appears twice")
        positions[i] = pos
    missing = [STANDARD_LEADS[i] for i in range(NUM_LEADS) if i not in positions]
    if missing:
        raise DataError(f"{source}: missing lead(s) {', '.join(missing)}")
    return [positions[i] for i in range(NUM_LEADS)]
