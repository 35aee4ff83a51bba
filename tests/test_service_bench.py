"""``benchmarks/service_bench.py --tiny``: the whole-runtime benchmark runs on the CPU, and a
returning viewer's prompt comes mostly from the engine's prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("engine_process", ["off", "on"])
def test_the_service_benchmark_runs_on_the_cpu(tmp_path: Path, engine_process: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import service_bench

    service_bench.main(["--tiny", "--model-dir", str(tmp_path / "tiny"), "--viewers", "4",
                        "--history", "1", "--new-tokens", "4",
                        "--engine-process", engine_process])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[1:] if "---" not in line]
    assert {row["side"] for row in rows} == {"runtime", "backend alone"}
    assert all(row["answered"] == row["offered"] for row in rows), rows
    runtime = [row for row in rows if row["side"] == "runtime"]
    # Returning viewers: most of each prompt (persona and their history) was not prefilled.
    assert all(int(row["prompt_tok_cached"]) > int(row["prompt_tok_computed"]) for row in runtime)
    # The decode loop's totals reach the table from the engine process too.
    assert all(int(row["steps"]) > 0 for row in rows)
