"""What a study asks and in which order: criteria, scales, and the blinded layouts.

Two designs:

* ``rating`` (Katzmann et al. 2021, Neurocomputing, section 3.4): a *question* is one case
  and one criterion; it shows the plain image and one overlay per method, each rated on an
  integer scale (default -4 ... 4). The order of the panels is drawn per reader and per
  question. Two questionnaire variants counter order effects: variant A asks the criteria
  in blocks, the cases shuffled within each block; variant B asks the same questions in
  the reverse order. Readers alternate between A and B.
* ``reader-performance`` (Sayres et al. 2019, as described by Huff et al. 2021, Phys Med
  Biol, section 6): each reader diagnoses each case once, in one of the arms *image
  alone*, *image + the model's prediction*, *image + prediction + map* (one arm per
  method), and gives a confidence; reading time is recorded. Arms rotate over cases and
  readers (a Latin square), so every reader sees every arm and, with a multiple of the
  number of arms as readers, every case is read equally often in every arm.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BUILTIN_CRITERIA",
    "CONFIDENCE_SCALE",
    "DEFAULT_CRITERIA",
    "DESIGNS",
    "Criterion",
    "PlannedQuestion",
    "Scale",
    "parse_criteria",
    "parse_scale",
    "rating_layout",
    "reader_performance_layout",
]

DESIGNS = ("rating", "reader-performance")


@dataclass(frozen=True)
class Criterion:
    """One question asked of every panel: a machine name, a label and the reader's prompt."""

    name: str
    label: str
    prompt: str


#: Katzmann et al. 2021, section 3.4: the three criteria of their user study.
DEFAULT_CRITERIA = (
    Criterion("intuitive_validity", "Intuitive validity", "Does it look reasonable?"),
    Criterion(
        "semantic_meaningfulness",
        "Semantic meaningfulness",
        "Does it make sense for this diagnosis?",
    ),
    Criterion("image_quality", "Image quality", "Does it look good?"),
)
BUILTIN_CRITERIA = {
    c.name: c
    for c in (
        *DEFAULT_CRITERIA,
        Criterion("localization", "Localization", "Does it point at the finding?"),
        Criterion("usefulness", "Usefulness", "Would it help you decide?"),
        Criterion("trust", "Trust", "Would you trust the model on this image?"),
    )
}


@dataclass(frozen=True)
class Scale:
    """An integer answer scale ``low ... high`` with end labels."""

    low: int = -4
    high: int = 4
    low_label: str = "low"
    high_label: str = "high"

    @property
    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1))

    def to_dict(self) -> dict[str, object]:
        return {
            "low": self.low,
            "high": self.high,
            "low_label": self.low_label,
            "high_label": self.high_label,
        }


#: The reader-performance design's confidence scale.
CONFIDENCE_SCALE = Scale(1, 5, "unsure", "certain")


def parse_criteria(spec: str | Sequence[str] | None) -> tuple[Criterion, ...]:
    """Criteria from a comma-separated string or a list of entries.

    An entry is a built-in name (``intuitive_validity``, ``semantic_meaningfulness``,
    ``image_quality``, ``localization``, ``usefulness``, ``trust``) or ``name=prompt`` for
    one of your own. None or empty gives :data:`DEFAULT_CRITERIA`.

    Raises
    ------
    ValueError
        An unknown built-in name (with the closest names), a malformed or repeated name.
    """
    if spec is None:
        return DEFAULT_CRITERIA
    entries = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else list(spec)
    entries = [e for e in entries if e]
    if not entries:
        return DEFAULT_CRITERIA
    out: list[Criterion] = []
    for entry in entries:
        name, sep, prompt = entry.partition("=")
        name = name.strip().lower().replace("-", "_").replace(" ", "_")
        if not name.replace("_", "").isalnum():
            raise ValueError(f"criterion name {name!r} must be letters, digits and underscores")
        if sep:
            if not prompt.strip():
                raise ValueError(f"criterion {name!r} has an empty question after '='")
            out.append(Criterion(name, name.replace("_", " ").capitalize(), prompt.strip()))
        elif name in BUILTIN_CRITERIA:
            out.append(BUILTIN_CRITERIA[name])
        else:
            close = difflib.get_close_matches(name, list(BUILTIN_CRITERIA), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown criterion {name!r}{hint} (built-in: {', '.join(BUILTIN_CRITERIA)}; "
                "define your own as name=question)"
            )
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"criterion {dupes[0]!r} is given twice")
    return tuple(out)


def parse_scale(spec: str | Sequence[int] | Scale | None) -> Scale:
    """``"-4,4"``, ``"-4..4"``, ``(low, high)`` or a :class:`Scale`; default -4 ... 4.

    The scale must hold 2 to 19 integers within -9 ... 9 (each value is one key press,
    a leading ``-`` for negative values).
    """
    if spec is None:
        return Scale()
    if isinstance(spec, Scale):
        low, high = spec.low, spec.high
        result = spec
    else:
        if isinstance(spec, str):
            parts = spec.replace("..", ",").replace(":", ",").split(",")
            try:
                low, high = (int(p) for p in parts if p.strip())
            except ValueError:
                raise ValueError(
                    f"scale must look like -4,4 or 1..5 (two integers), got {spec!r}"
                ) from None
        else:
            low, high = (int(v) for v in spec)
        result = Scale(low, high)
    if not -9 <= low < high <= 9:
        raise ValueError(
            f"the scale must run from a lower to a higher integer within -9 ... 9, got "
            f"{low} ... {high}"
        )
    return result


@dataclass(frozen=True)
class PlannedQuestion:
    """One question of one reader: the case (index into the drawn cases), the criterion
    (rating design) or arm (reader-performance design), and the panel order as indices
    into the method list (rating design)."""

    reader: int
    seq: int
    case: int
    criterion: str | None = None
    slots: tuple[int, ...] = ()
    arm: int | None = None


def reader_variants(n_readers: int) -> list[str]:
    """Readers alternate between questionnaire variants A and B."""
    return ["A" if r % 2 == 0 else "B" for r in range(n_readers)]


def rating_layout(
    n_cases: int,
    n_methods: int,
    n_readers: int,
    criteria: Sequence[str],
    seed: int,
) -> list[PlannedQuestion]:
    """The rating design's questions for every reader (see the module docstring).

    Variant A: one block per criterion in the given order, the cases in a seeded random
    order within each block (a new order per block); variant B: the same list reversed.
    The panel order is drawn independently for every reader and question.
    """
    if n_cases < 1 or n_methods < 1 or n_readers < 1 or not criteria:
        raise ValueError("a rating study needs at least one case, method, reader and criterion")
    rng = np.random.default_rng(seed)
    sequence_a = [(int(c), crit) for crit in criteria for c in rng.permutation(n_cases)]
    out: list[PlannedQuestion] = []
    for reader, variant in enumerate(reader_variants(n_readers)):
        sequence = sequence_a if variant == "A" else sequence_a[::-1]
        for seq, (case, crit) in enumerate(sequence):
            slots = tuple(int(m) for m in rng.permutation(n_methods))
            out.append(PlannedQuestion(reader, seq, case, crit, slots))
    return out


def reader_performance_layout(
    n_cases: int, n_arms: int, n_readers: int, seed: int
) -> list[PlannedQuestion]:
    """Each reader reads each case once; arm ``(rank(case) + reader) mod n_arms`` where
    ``rank`` is a seeded permutation of the cases; each reader's case order is shuffled."""
    if n_cases < 1 or n_arms < 1 or n_readers < 1:
        raise ValueError("a reader-performance study needs at least one case, arm and reader")
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n_cases)
    out: list[PlannedQuestion] = []
    for reader in range(n_readers):
        for seq, case in enumerate(rng.permutation(n_cases)):
            arm = int((rank[case] + reader) % n_arms)
            out.append(PlannedQuestion(reader, seq, int(case), None, (), arm))
    return out
