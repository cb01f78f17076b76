"""FoldReport: what a fold pass did with every BatchNorm it met, and why."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any

__all__ = [
    "FOLDED_INTO_FOLLOWING",
    "FOLDED_INTO_PRECEDING",
    "FOLDED_INTO_PRODUCERS",
    "KEPT",
    "MERGED_INTO_BRANCH",
    "SUBTRACTED",
    "MergeEntry",
    "FoldReport",
    "LayerEntry",
    "reason_class",
]

FOLDED_INTO_PRECEDING = "folded into preceding"
FOLDED_INTO_FOLLOWING = "folded into following"
FOLDED_INTO_PRODUCERS = "folded into producers"
MERGED_INTO_BRANCH = "merged into a parallel conv"
KEPT = "kept"


@dataclasses.dataclass
class LayerEntry:
    """One BatchNorm and what happened to it.

    Attributes:
        name: Module qualified name (PyTorch) or node name (ONNX).
        kind: The BN's type, e.g. ``BatchNorm2d`` or ``BatchNormalization``.
        action: One of the ``FOLDED_*`` constants or ``KEPT``.
        targets: Layers that absorbed the BN (empty when kept).
        reason: Why the BN was kept; empty when folded.
        notes: Anything else a user should know (subnormals flushed, copies made).
    """

    name: str
    kind: str
    action: str = KEPT
    targets: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def folded(self) -> bool:
        """Whether this BN is gone from the result."""
        return self.action != KEPT


SUBTRACTED = "(subtracted)"  # ends the label of a branch merged with a minus sign


@dataclasses.dataclass
class MergeEntry:
    """Parallel branches summed, merged into one convolution.

    Attributes:
        sum: The sum node the merged layer replaces.
        branches: The branches merged (convolutions, BNs, ``identity``).
        into: The convolution that now computes the sum.
    """

    sum: str
    branches: list[str]
    into: str

    @property
    def expression(self) -> str:
        """The branches as a sum: ``a + b - c`` (a subtracted branch's label ends in :data:`SUBTRACTED`)."""
        text = ""
        for branch in self.branches:
            name = branch.removesuffix(f" {SUBTRACTED}")
            sign = "-" if name != branch else "+"
            text = f"{text} {sign} {name}" if text else (f"-{name}" if sign == "-" else name)
        return text


@dataclasses.dataclass
class FoldReport:
    """The per-BN outcome of one fold pass, plus totals.

    Attributes:
        method: How the data flow was found (``torch.fx``, ``recorded``, ``onnx``).
        layers: One entry per BN, in graph order.
        notes: Model-level remarks (e.g. the limits of the method used).
        merges: Parallel branches merged into one convolution.
    """

    method: str
    layers: list[LayerEntry] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    merges: list[MergeEntry] = dataclasses.field(default_factory=list)

    @property
    def bn_total(self) -> int:
        """Number of BatchNorms met."""
        return len(self.layers)

    @property
    def bn_folded(self) -> int:
        """Number of BatchNorms folded away."""
        return sum(entry.folded for entry in self.layers)

    @property
    def bn_kept(self) -> int:
        """Number of BatchNorms left in the result."""
        return self.bn_total - self.bn_folded

    def entry(self, name: str) -> LayerEntry:
        """The entry for the BN called ``name``.

        Raises:
            KeyError: No BN of that name was met.
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary with totals and one record per BN."""
        return {
            "method": self.method,
            "bn_total": self.bn_total,
            "bn_folded": self.bn_folded,
            "bn_kept": self.bn_kept,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "merges": [dataclasses.asdict(merge) for merge in self.merges],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        """A readable table: one row per BN, then the totals."""
        return self.render()

    def render(self, *, dry_run: bool = False, summary: bool = False) -> str:
        """The report as text.

        Args:
            dry_run: Say "would fold" (``bnfold inspect``: nothing is written).
            summary: Counts by outcome and by reason class instead of one row per BN.
        """
        verb = "would fold" if dry_run else "folded"
        if summary:
            return self._summary(verb)
        rows = [("BN", "kind", "action", "into / reason")]
        for layer in self.layers:
            detail = ", ".join(layer.targets) if layer.folded else layer.reason
            if layer.notes:
                detail += f" ({'; '.join(layer.notes)})"
            action = layer.action.replace("folded", "would fold") if dry_run else layer.action
            rows.append((layer.name, layer.kind, action, detail))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows]
        lines.insert(1, "-" * min(100, sum(widths) + 6 + max(len(row[3]) for row in rows)))
        lines.append(self._totals(verb))
        lines += [f"merged {m.sum}: {m.expression} -> {m.into}" for m in self.merges]
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(line.rstrip() for line in lines)

    def _totals(self, verb: str) -> str:
        return f"{self.bn_total} BatchNorm(s): {self.bn_folded} {verb}, {self.bn_kept} kept (data flow: {self.method})"

    def _summary(self, verb: str) -> str:
        outcomes = collections.Counter(layer.action for layer in self.layers)
        reasons = collections.Counter(reason_class(layer.reason) for layer in self.layers if not layer.folded)
        lines = [self._totals(verb)]
        lines += [f"  {count:>6}  {action.replace('folded', verb)}" for action, count in outcomes.most_common()]
        if self.merges:
            lines.append(f"  {len(self.merges):>6}  sums of parallel branches merged into one conv")
        if reasons:
            lines.append("kept, by reason:")
            lines += [f"  {count:>6}  {name}" for name, count in reasons.most_common()]
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


# why a BN was kept, as a class: what no exact fold can remove (one class for each direction tried)
REASON_CLASSES = [
    (r"not called by forward", "not run by forward (unused module, e.g. an aux head)"),
    (r"applies more after BN", "an activation follows inside the BN-act module"),
    (r"zero-pads", "the next layer zero-pads"),
    (r"following ConvTranspose", "the next layer is a ConvTranspose"),
    (r"model output|graph output|graph input|model input|output is unused", "model input or output"),
    (r"also read by|read by \d+ (consumers|operations)", "the value is also read elsewhere"),
    (r"is not a Conv|not a Conv/Linear|is unknown", "the neighbour is not a linear layer"),
    (r"track_running_stats|batch statistics|training_mode|training=True", "uses batch statistics"),
    (r"custom forward|not traceable|its own forward", "custom forward not understood"),
    (r"scale is not positive", "a BN scale is not positive (BN does not commute with a max pool)"),
    (r"called \d+ time|registered under|hooks|parametriz", "module shared, hooked or parametrized"),
    (r"weight|tied|parameters are shared", "the layer's weight is shared or read elsewhere"),
    (r"channel|axis|rank", "channel axis does not line up"),
    (r"overflow|not finite|negative|divides by zero", "statistics unusable (overflow, negative, non-finite)"),
    (r"constant", "a parameter is not a constant"),
]


def _side_class(text: str) -> str:
    for pattern, name in REASON_CLASSES:
        if re.search(pattern, text):
            return name
    return "other: " + text[:60]


def reason_class(reason: str | None) -> str:
    """The class of a kept BN's reason: one per direction tried (``before: ...; after: ...``)."""
    reason = reason or ""
    parts = re.findall(r"(before|after): (.*?)(?=; after: |$)", reason)
    if not parts:
        return _side_class(reason)
    return "; ".join(f"{side}: {_side_class(text)}" for side, text in parts)
