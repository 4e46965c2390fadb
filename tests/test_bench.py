"""The parts benchmark runs against this tree's code (figures are for bench.parts, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_parts_benchmark_measures_every_part_once(tmp_path):
    output = tmp_path / "parts.json"

    done = subprocess.run(
        [sys.executable, "-m", "bench.parts", "--rounds", "1", "--json", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| db", "| read", "| asgi"]
    results = json.loads(output.read_text())["results"]["this tree"]
    assert results["db"][0]["value"] > 0
    assert results["read"][0]["reads_per_token"] >= 1  # every token read, none lost
    assert results["asgi"][0]["turn_ms"] > results["asgi"][0]["floor_ms"] > 0
