"""The benchmark judges each run against issue #5's targets, and says which machine the run was on."""

from __future__ import annotations

from pathlib import Path

from bench.targets import TARGETS, judge, machine, verdict_lines


def run_at_the_limits() -> tuple[list[dict[str, object]], dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"scenario": "cold", "clients": 64, "ratio_to_reference": 0.80, "p99_ms": 250.0, "errors": 0},
        {"scenario": "cold", "clients": 150, "rps": 690.0, "errors": 0},
        {"scenario": "warm", "clients": 64, "ratio_to_reference": 0.70, "p99_ms": 20.0, "errors": 0},
    ]
    facts: dict[str, object] = {
        "single_uncached_p50_ms": 15.0,
        "single_cached_p50_ms": 3.0,
        "server_peak_rss_mib": 1024,
        "first_start_to_ready_s": 20.0,
    }
    return rows, facts


def test_every_target_is_met_at_its_limit_and_missed_just_past_it() -> None:
    rows, facts = run_at_the_limits()
    verdicts = judge(rows, facts)
    assert len(verdicts) == len(TARGETS)
    assert all(v["met"] for v in verdicts), [v for v in verdicts if not v["met"]]

    rows[0]["p99_ms"] = 250.1
    rows[1]["rps"] = 689.9
    facts["single_cached_p50_ms"] = 3.01
    missed = {v["target"] for v in judge(rows, facts) if not v["met"]}
    assert missed == {"cold 64: p99_ms", "cold 150: rps", "single_cached_p50_ms"}


def test_a_target_that_was_not_measured_is_not_met() -> None:
    rows, facts = run_at_the_limits()
    rows[2].pop("ratio_to_reference")  # the bench gives no ratio to a row with errors
    del facts["server_peak_rss_mib"]
    verdicts = {v["target"]: v for v in judge(rows, facts)}
    assert verdicts["warm 64: ratio_to_reference"] == {
        "target": "warm 64: ratio_to_reference",
        "goal": ">= 0.7",
        "measured": None,
        "met": False,
        "machine_bound": "",
    }
    assert not verdicts["server_peak_rss_mib"]["met"]
    lines = verdict_lines(list(verdicts.values()))
    assert "| warm 64: ratio_to_reference | >= 0.7 | None | **no** |  |" in lines


def test_the_run_s_references_bound_what_the_machine_allows() -> None:
    """10x at 150 clients past the model alone, or a warm p99 under what BentoML's own rate allows 64 clients, is the
    machine, not the service."""
    rows, facts = run_at_the_limits()
    rows[1]["rps"] = 400.1
    facts |= {"model_alone_qps": 454.5, "trivial_rps_64": 3183.4}
    verdicts = {v["target"]: v for v in judge(rows, facts)}
    assert verdicts["cold 150: rps"]["machine_bound"] == "<= 454.5 (the model alone)"
    assert verdicts["cold 64: p99_ms"]["machine_bound"] == ">= 140.8 (64 clients at the model alone's rate)"
    assert verdicts["warm 64: p99_ms"]["machine_bound"] == ">= 20.1 (64 clients at the trivial endpoint's rate)"
    assert verdicts["single_cached_p50_ms"]["machine_bound"] == ""
    lines = verdict_lines(list(verdicts.values()))
    assert "| cold 150: rps | >= 690 | 400.1 | **no** | <= 454.5 (the model alone) |" in lines


def test_the_machine_is_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example CPU @ 2.60GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Example CPU @ 2.60GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    )
    found = machine(cpuinfo)
    assert found["cpu"] == "Example CPU @ 2.60GHz"
    assert found["isa"] == ["avx2", "avx512f", "avx512_vnni"]
    assert machine(tmp_path / "absent")["isa"] == []
