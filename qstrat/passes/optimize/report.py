"""What the optimize passes did: one entry per change or skip, with the node and the reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PassEvent:
    pass_name: str
    node: str
    kind: str  # "changed" | "skipped"
    detail: str
    partner: str = ""  # the other node a change involves (the conv a BatchNormalization folds into; CLE's tail)


@dataclass
class OptimizeReport:
    """Every change and every skip of the optimize stage, in pass order."""

    events: list[PassEvent] = field(default_factory=list)
    passes_run: list[str] = field(default_factory=list)

    def changed(self, pass_name: str, node: str, detail: str, partner: str = "") -> None:
        self.events.append(PassEvent(pass_name, node, "changed", detail, partner))

    def skipped(self, pass_name: str, node: str, detail: str) -> None:
        self.events.append(PassEvent(pass_name, node, "skipped", detail))

    def of(self, pass_name: str, kind: str | None = None) -> list[PassEvent]:
        return [e for e in self.events if e.pass_name == pass_name and (kind is None or e.kind == kind)]

    def table(self) -> str:
        rows = [f"{'pass':<24} {'node':<28} {'result':<8} detail"]
        rows += [f"{e.pass_name:<24} {e.node:<28} {e.kind:<8} {e.detail}" for e in self.events]
        return "\n".join(rows)
