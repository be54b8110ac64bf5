"""What `export_onnx` reports: the quantizers it wrote, and where the file may differ from the Keras model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The ONNX Runtime session option that keeps S8S8 QDQ graphs on int8 kernels (no u8 x s8 pair sums).
QDQ_INT8_OPTION = "session.qdqisint8allowed"

OPSET21_NOTE = (
    "ONNX Runtime (1.32 and earlier) cannot load QDQ files of opset 21 or later whose QuantizeLinear feeds a "
    "layout Transpose in its default session (its QDQ propagation and S8-to-U8 rewrites disagree on the type). "
    f'Create the session with the option "{QDQ_INT8_OPTION}" = "1", or with '
    'disabled_optimizers=["QDQPropagationTransformer"]; or export at opset 20 or earlier when the grids allow it.'
)


class SaturationWarning(UserWarning):
    """An exported layer's integer kernel can saturate on x86 CPUs without VNNI."""


@dataclass
class ExportReport:
    """What `export_onnx` wrote, and where the file may differ from the Keras model."""

    path: str
    opset: int
    bytes: int = 0
    nodes: int = 0
    quantizers: list[dict] = field(default_factory=list)
    bias_requantized: list[dict] = field(default_factory=list)
    saturation_risk: list[dict] = field(default_factory=list)
    rounding_mismatch: list[dict] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def inexact(self) -> list[dict]:
        """Quantizers whose rounding ONNX's QuantizeLinear (half to even) does not reproduce."""
        return [q for q in self.quantizers if q["target_type"] in ("output", "input") and not q["exact_rounding"]]

    def summary(self) -> str:
        lines = [f"{self.path}: opset {self.opset}, {self.nodes} nodes, {self.bytes / 1024:.1f} KiB"]
        lines.append(f"  {len(self.quantizers)} quantizers exported as QDQ")
        if self.inexact():
            names = ", ".join(q["target"] for q in self.inexact()[:4]) + (" ..." if len(self.inexact()) > 4 else "")
            lines.append(
                f"  {len(self.inexact())} round ties differently from ONNX (half to even): {names}"
                + ("" if self.rounding_mismatch else " (pass data to count the mismatches)")
            )
        for r in self.rounding_mismatch:
            lines.append(f"    {r['target']}: {r['mismatches']} of {r['elements']} elements round differently")
        for r in self.bias_requantized:
            lines.append(f"  {r['layer']}: int32 bias at the accumulator scale, max error {r['max_error']:.3g}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for r in self.saturation_risk:
            lines.append(
                f"  {r['layer']}: int16 pair sums can saturate in {r['channels']} channels (bound {r['bound']})"
            )
        return "\n".join(lines)
