"""What a step prints: per-path figures, where the time goes, added latency, the targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.load.loadgen import STAGES, Phase, nearest_rank
from bench.load.servers import MIB

# Reporting


@dataclass
class Step:
    clients: int
    direct: Phase
    fluxport: Phase
    notes: list[str] = field(default_factory=list)
    hop_ms: list[float] = field(default_factory=list)  # unloaded: the hop floor's calls

    @property
    def hop_p50(self) -> float:
        return nearest_rank(self.hop_ms, 0.5)

    @property
    def label(self) -> str:
        return "unloaded" if self.clients == 1 else f"{self.clients} clients"

    def added_ms(self, q: float) -> float:
        return self.fluxport.latency_ms(q) - self.direct.latency_ms(q)

    @property
    def ratio(self) -> float:
        return self.fluxport.throughput / self.direct.throughput if self.direct.throughput else float("nan")


def fmt_errors(phase: Phase) -> str:
    errors = phase.errors
    if not errors:
        return "0"
    return f"{sum(errors.values())} (" + ", ".join(f"{k}: {v}" for k, v in errors.most_common()) + ")"


def print_step(step: Step) -> None:
    print(f"\n== {step.label}: {step.clients} concurrent client(s), {step.direct.window_s:g} s measured ==")
    head = f"{'path':<9} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}"
    head += (
        f" {'429+RA':>6} {'cpu flux/emu/cli/other':>23} {'flux CPU ms/req':>15} {'user/sys':>11}"
        f" {'emu ms/req':>10} {'cli ms/req':>10} {'loop lag p99/max':>17}  errors"
    )
    print(head)
    for phase in (step.direct, step.fluxport):
        cpu = "/".join(f"{phase.cpu.get(k, 0.0):.0%}" for k in ("fluxport", "emulator", "client", "others"))
        done = len(phase.samples) or 1
        client_ms = phase.cpu.get("client", 0.0) * phase.wall_s / done * 1000
        user, system = (seconds / done * 1000 for seconds in phase.fluxport_user_sys)
        # The emulator serves the same exchanges a request makes (fal: submit, status, result,
        # download): aiohttp's server side of them, a floor for any Python client side.
        emulator_ms = phase.cpu.get("emulator", 0.0) * phase.wall_s / done * 1000
        print(
            f"{phase.path:<9} {len(phase.ok_in_window):>8} {phase.throughput:>8.1f} "
            f"{phase.latency_ms(0.5):>9.1f} {phase.latency_ms(0.95):>9.1f} {phase.latency_ms(0.99):>9.1f} "
            f"{phase.deliberate:>6} {cpu:>23} {user + system:>15.2f} {f'{user:.2f}/{system:.2f}':>11} "
            f"{emulator_ms:>10.2f} "
            f"{client_ms:>10.2f} "
            f"{phase.loop_lag_ms[0]:>8.1f}/{phase.loop_lag_ms[1]:<8.1f}  "
            f"{fmt_errors(phase)}"
        )
    print(
        f"added latency (fluxport - direct): p50 {step.added_ms(0.5):+.1f} ms, "
        f"p95 {step.added_ms(0.95):+.1f} ms, p99 {step.added_ms(0.99):+.1f} ms; "
        f"throughput {step.ratio:.3f} x direct; fluxport peak RSS {step.fluxport.peak_rss / MIB:.0f} MiB"
    )
    if step.fluxport.stages:
        print(
            f"  {'where the time goes (ms)':<22} {'direct p50/p99':>18} {'fluxport p50/p99':>18}"
            f" {'added p50':>10}"
        )
        for name, _, _ in STAGES:
            d, f = step.direct.stages.get(name, []), step.fluxport.stages.get(name, [])
            dp, fp = (
                (nearest_rank(d, 0.5), nearest_rank(d, 0.99)),
                (nearest_rank(f, 0.5), nearest_rank(f, 0.99)),
            )
            print(
                f"  {name:<22} {dp[0]:>8.1f}/{dp[1]:<9.1f} {fp[0]:>8.1f}/{fp[1]:<9.1f}"
                f" {fp[0] - dp[0]:>+10.1f}"
            )
    if step.hop_ms:
        own = step.added_ms(0.5) - step.hop_p50
        print(
            f"  one extra HTTP hop alone (a no-op server on fluxport's stack, the same client): "
            f"p50 {step.hop_p50:.2f} ms, p99 {nearest_rank(step.hop_ms, 0.99):.2f} ms "
            f"({len(step.hop_ms)} calls); fluxport's own share of the added p50: {own:+.2f} ms"
        )
    for note in step.notes:
        print(f"note: {note}")


def check_targets(steps: list[Step], peak_rss: int) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured in this run), the figure)."""
    by = {s.clients: s for s in steps}
    rows: list[tuple[str, bool | None, str]] = []
    errors = sum(sum(s.fluxport.errors.values()) + sum(s.direct.errors.values()) for s in steps)
    deliberate = sum(s.fluxport.deliberate + s.direct.deliberate for s in steps)
    rows.append(
        (
            "zero errors beyond deliberate 429s with Retry-After",
            errors == 0,
            f"{errors} errors, {deliberate} deliberate 429s",
        )
    )

    def unloaded(s: Step) -> tuple[bool, str]:
        figure = f"{s.added_ms(0.5):+.2f} ms"
        if s.hop_ms:
            figure += f" (the hop alone: {s.hop_p50:.2f} ms)"
        return s.added_ms(0.5) <= 2, figure

    def at(clients: int, name: str, test: Callable[[Step], tuple[bool, str]]) -> None:
        step = by.get(clients)
        if step is None:
            rows.append((name, None, f"not run (no {clients}-client step)"))
        else:
            ok, figure = test(step)
            rows.append((name, ok, figure))

    at(200, "200 clients: throughput >= 0.95 x direct", lambda s: (s.ratio >= 0.95, f"{s.ratio:.3f} x"))
    at(
        200,
        "200 clients: added p99 <= 100 ms",
        lambda s: (s.added_ms(0.99) <= 100, f"{s.added_ms(0.99):+.1f} ms"),
    )
    at(500, "500 clients: throughput >= 0.9 x direct", lambda s: (s.ratio >= 0.9, f"{s.ratio:.3f} x"))
    at(1, "unloaded: added p50 <= 2 ms", unloaded)
    rows.append(("fluxport peak RSS <= 500 MiB", peak_rss <= 500 * MIB, f"{peak_rss / MIB:.0f} MiB"))
    return rows
