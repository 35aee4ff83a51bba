"""The memory benchmark runs on the CPU (its quick mode, the cheap configurations): every
viewer's question goes through the runtime, and no prompt ever holds another viewer's fact."""

from __future__ import annotations

from benchmarks.memory_bench import _arguments, main


async def test_the_memory_benchmark_runs_and_never_mixes_viewers(capsys: object) -> None:
    rows = await main(_arguments(["--quick", "--viewers", "6", "--sessions", "5", "--chatter", "4",
                                  "--modes", "lexical only,history only"]))
    assert [row["configuration"] for row in rows] == ["lexical only", "history only"]
    assert all(row["contaminated"] == 0 for row in rows)
    assert rows[1]["recall_pct"] == 0.0  # history alone cannot reach back that far
