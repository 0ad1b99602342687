"""The competition's exact strings: conditions, levels, labels, series descriptions, column and row ids.

Every stage speaks these names, so they live in the contract package that prep and train both depend on.
"""

from __future__ import annotations

from cache.errors import SettingError

CONDITIONS: tuple[str, ...] = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
LEVELS: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
LABELS: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
# Column names of the submission, in the same order as LABELS.
PROB_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
SERIES_DESCRIPTIONS: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")

# The series each condition is read on (the label tables agree with this for >99.9 % of rows).
CONDITION_SERIES: dict[str, str] = {
    "Spinal Canal Stenosis": "Sagittal T2/STIR",
    "Left Neural Foraminal Narrowing": "Sagittal T1",
    "Right Neural Foraminal Narrowing": "Sagittal T1",
    "Left Subarticular Stenosis": "Axial T2",
    "Right Subarticular Stenosis": "Axial T2",
}
# Metric groups: left and right are scored together.
CONDITION_GROUP: dict[str, str] = {
    "Spinal Canal Stenosis": "spinal",
    "Left Neural Foraminal Narrowing": "foraminal",
    "Right Neural Foraminal Narrowing": "foraminal",
    "Left Subarticular Stenosis": "subarticular",
    "Right Subarticular Stenosis": "subarticular",
}
# Which side of the patient a condition is on; None for the midline canal.
CONDITION_SIDE: dict[str, str | None] = {
    "Spinal Canal Stenosis": None,
    "Left Neural Foraminal Narrowing": "left",
    "Right Neural Foraminal Narrowing": "right",
    "Left Subarticular Stenosis": "left",
    "Right Subarticular Stenosis": "right",
}
CLASS_WEIGHTS: tuple[float, float, float] = (1.0, 2.0, 4.0)  # the metric's sample weights per true label


def slug(text: str) -> str:
    """'Left Neural Foraminal Narrowing' -> 'left_neural_foraminal_narrowing', 'L4/L5' -> 'l4_l5'."""
    return text.lower().replace("/", "_").replace(" ", "_")


def label_column(condition: str, level: str) -> str:
    """train.csv column of a (condition, level), e.g. 'spinal_canal_stenosis_l4_l5'."""
    return f"{slug(condition)}_{slug(level)}"


# train.csv label columns in file order: condition-major, level-minor.
LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(c, lv) for c in CONDITIONS for lv in LEVELS)


def row_id(study_id: int, condition: str, level: str) -> str:
    """Submission row id, e.g. '44036939_spinal_canal_stenosis_l4_l5'."""
    return f"{int(study_id)}_{label_column(condition, level)}"


def submission_row_ids(study_ids: list[int]) -> list[str]:
    """Row ids in the sample submission's order: studies as given, then condition-level names sorted."""
    names = sorted(LABEL_COLUMNS)
    return [f"{int(s)}_{n}" for s in study_ids for n in names]


def label_code(value: object) -> int | None:
    """'Normal/Mild' -> 0, 'Moderate' -> 1, 'Severe' -> 2; empty cell -> None; anything else raises."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    try:
        return LABELS.index(str(value))
    except ValueError:
        raise ValueError(f"unknown label {value!r}; expected one of {LABELS} or an empty cell") from None


def parse_condition(text: str) -> str:
    """One condition, spelled as everywhere in lsdc (name, slug, or a group of one): 'spinal_canal_stenosis' and
    'spinal' -> 'Spinal Canal Stenosis'. A group of two ('foraminal') raises, naming its members."""
    found = expand_conditions([text])
    if len(found) != 1:
        raise SettingError(f"{text!r} means {len(found)} conditions {list(found)}: name one")
    return found[0]


def expand_conditions(parts) -> tuple[str, ...]:
    """Conditions from names, slugs, groups ('spinal', 'foraminal', 'subarticular') or 'all', in the order given (a
    group in competition order): ['foraminal'] -> ('Left Neural Foraminal Narrowing', 'Right ...'). A string may
    list several, comma-separated. Raises on an unknown part, naming what is accepted."""
    if isinstance(parts, str):
        parts = parts.split(",")
    parts = list(parts)
    out: list[str] = []
    for part in (str(p).strip() for p in parts):
        if not part:
            continue
        key = slug(part)
        found = [c for c in CONDITIONS if key in (slug(c), CONDITION_GROUP[c], "all")]
        if not found:
            raise SettingError(f"unknown condition {part!r}; expected a name or snake_case name of {list(CONDITIONS)}, "
                             f"a group ({', '.join(sorted(set(CONDITION_GROUP.values())))}) or 'all'")
        out += found
    if parts and not out:
        raise SettingError(f"no condition named in {parts!r}")
    return tuple(out)


def parse_level(text: str) -> str:
    """A level from 'L4/L5', 'l4_l5' or 'L4-L5': -> 'L4/L5'."""
    found = {slug(lv): lv for lv in LEVELS}.get(slug(text.strip().replace("-", "/")))
    if found is None:
        raise SettingError(f"unknown level {text!r}; expected one of {list(LEVELS)} (or l4_l5 style)")
    return found
