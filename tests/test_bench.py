"""Both benchmarks run against this tree's code; their figures are theirs to publish, not tests'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.fake_upstream import bench_reply

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *args: str) -> str:
    """Run ``python -m <module> <args>`` from the repository's root; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_parts_benchmark_measures_every_part_once(tmp_path):
    output = tmp_path / "parts.json"

    stdout = run_benchmark("bench.parts", "--rounds", "1", "--json", str(output))

    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| db", "| read", "| asgi"]
    results = json.loads(output.read_text())["results"]["this tree"]
    assert results["db"][0]["value"] > 0
    # About a read per token, as they arrive one at a time (a loaded machine merges a few);
    # that none is lost the part itself asserts, or it would have failed above.
    assert results["read"][0]["reads_per_token"] == pytest.approx(1, abs=0.2)
    assert results["asgi"][0]["turn_ms"] > results["asgi"][0]["floor_ms"] > 0


def test_benchmark_relays_every_token_and_measures_the_floors_in_each_scenario(tmp_path):
    output = tmp_path / "run.json"

    stdout = run_benchmark("bench.run", "--turns", "8", "--formats", "--json", str(output))

    scenarios = {s["scenario"]["name"]: s for s in json.loads(output.read_text())["scenarios"]}
    assert sorted(scenarios) == ["hold", "latency", "throughput", "tools"]
    for name, result in scenarios.items():
        proxy, saved = result["proxy"], result["database"]
        assert (proxy["ok"], proxy["bad_text"], proxy["errors"]) == (8, 0, {}), name
        assert saved["ok"] == saved["expected"] > 8, name  # warm-up turns and floor slices too
        assert proxy["server_cpu_ms_per_1k_tokens"] > 0, name
    assert scenarios["throughput"]["django_floor"]["ok"] == {"floor": 8, "bare": 8, "turn": 8}
    formats = scenarios["throughput"]["formats"]  # --formats: each format's turns alternated
    assert formats["ok"] == {"ndjson": 10, "sse": 10, "openai": 10, "ui": 10}
    assert all(formats["server_cpu_ms_per_1k_tokens"].values())
    for name in ("latency", "hold"):
        floors = scenarios[name]["django_floor_times"]
        assert {floor["ok"] for floor in floors.values()} == {8}, name
        assert all(floor["first_line_ms"]["p50"] > 0 for floor in floors.values()), name
    assert "| latency | 8/8 | 0 | 0 |" in stdout
    tools = scenarios["tools"]["proxy"]  # 310 deltas a turn, of which 200 answer tokens
    per_delta = tools["server_cpu_ms_per_1k_tokens"] * 200 / 310
    assert tools["server_cpu_ms_per_1k_deltas"] == pytest.approx(per_delta)
    assert f"({per_delta:,.1f} per 1k deltas)" in stdout


async def test_bench_reply_counts_each_chunk_that_carries_a_delta(upstream):
    reply = bench_reply(5, 0.0, None, reasoning=3, tool_calls=2)
    upstream.enqueue(reply)
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=upstream.base_url)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    carrying = 0
    async for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        extra = (delta.model_extra or {}) if delta else {}
        if delta and (delta.content or delta.tool_calls or extra.get("reasoning_content")):
            carrying += 1
    await client.close()
    assert carrying == reply.deltas() == 3 + 5 + 2 * 5  # each call: its head, 4 pieces of 27
