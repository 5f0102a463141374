"""benchmarks/plots.py: the PNGs it writes for a result file of benchmarks/bench.py.

`benchmarks/` is a directory of scripts, not a package (no `__init__.py`); it is imported
here as a namespace package from the repository root.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk (the first one, after the signature)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", head[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def system(jobs_per_s: float | None, **metrics: float | None) -> dict[str, Any]:
    """One system's metrics: all the keys bench.py writes, null unless given."""
    keys = ("p50_s", "p95_s", "p99_s", "api_calls_per_job", "cpu_ms_per_job", "peak_rss_mib")
    return {"jobs_per_s": jobs_per_s, "failed": 0, "lost": 0, **dict.fromkeys(keys), **metrics}


def control_plane(latency_ms: int, ours: float, sequential: float | None) -> dict[str, Any]:
    times = {"p50_s": 0.02 + latency_ms / 1000, "p95_s": 0.05, "p99_s": None}
    return {
        "params": {"latency_ms": latency_ms, "jobs": 200},
        "systems": {
            "cpworker": system(ours, cpu_ms_per_job=1.5, peak_rss_mib=60.0, **times),
            "boto3_sequential": system(sequential, cpu_ms_per_job=9.0, peak_rss_mib=80.0),
            "boto3_threads": system(ours / 3, cpu_ms_per_job=None, extra_key=1.0),
        },
    }


def sample_result() -> dict[str, Any]:
    """Three systems, a few scenarios with null metrics; control_plane_50ms is missing."""
    return {
        "machine": {"cpus": 2, "cpu_model": "Test CPU @ 2.0GHz", "python": "3.11.7"},
        "mode": "quick",
        "scenarios": {
            "control_plane_0ms": control_plane(0, 900.0, 120.0),
            "control_plane_20ms": control_plane(20, 400.0, None),
            "big_artifact": {
                "params": {"size_mib": 64},
                "systems": {
                    "cpworker": system(None, mib_per_s=95.0, peak_rss_mib=140.0, p50_s=1.2),
                    "aws_s3_cp": system(None, mib_per_s=100.0, peak_rss_mib=None),
                },
            },
            "idle": {"params": {}, "systems": {"cpworker": system(None, cpu_ms_per_job=0.2)}},
        },
    }


def test_writes_every_figure_beside_the_result(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    written = plots.write_plots(sample_result(), out)
    names = ["throughput", "cpu", "latency", "resources"]
    assert written == [tmp_path / f"run-{name}.png" for name in names]
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert png_size(path) == (1200, 700), path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_skips_figures_without_data(tmp_path: Path) -> None:
    result = sample_result()
    only = {"big_artifact": result["scenarios"]["big_artifact"]}
    written = plots.write_plots({**result, "scenarios": only}, tmp_path / "r.json")
    assert [p.name for p in written] == ["r-latency.png", "r-resources.png"]
    assert sorted(tmp_path.iterdir()) == sorted(written)


@pytest.mark.parametrize(
    "scenarios",
    [
        {},
        {"handler_bound": {"params": {}, "systems": {}}},
        {"handler_bound": {"params": {}, "systems": {"cpworker": system(None)}}},
    ],
    ids=["no-scenarios", "no-systems", "all-null"],
)
def test_no_data_writes_nothing(tmp_path: Path, scenarios: dict[str, Any]) -> None:
    result = {"machine": {}, "mode": "full", "scenarios": scenarios}
    assert plots.write_plots(result, tmp_path / "empty.json") == []
    assert list(tmp_path.iterdir()) == []


def test_command_line_prints_the_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(sample_result()))
    assert plots.main([str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(tmp_path / f"bench-{n}.png") for n in ("throughput", "cpu", "latency", "resources")
    ]
    assert all(Path(p).is_file() for p in printed)
