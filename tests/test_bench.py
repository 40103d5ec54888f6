"""The benchmarks' own measuring rules."""

from __future__ import annotations

from bench.inference import best_of_rounds


def test_a_scenarios_engines_are_measured_in_turns_and_each_keeps_its_best_round():
    calls: list[str] = []
    results = {"tunewire": [(64, 2.0), (64, 1.0), (64, 1.5)], "baseline": [(64, 1.0), (32, 1.0), (64, 4.0)]}

    def measure(engine: str):
        def run() -> tuple[int, float]:
            calls.append(engine)
            return results[engine].pop(0)

        return run

    best = best_of_rounds([("tunewire", measure("tunewire")), ("baseline", measure("baseline"))], rounds=3)
    assert calls == ["tunewire", "baseline"] * 3
    assert best == [("tunewire", 64, 1.0), ("baseline", 64, 1.0)]
