"""benchmarks/thread_scaling.py on a tiny shape: the JSON structure, the table and its arithmetic
(a smoke test: no warm-up, one timed run; no assertion on how well this machine scales)."""
import json
import math

import pytest

from benchmarks.thread_scaling import PASSES, main
from src.kernels.indrnn_cpu import numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="times the numba-compiled CPU loops")

TINY = "T40_B2_I1_H8"


def test_json_table_and_ratios(tmp_path, capsys):
    path = tmp_path / "scaling.json"
    results = main(["--shapes", TINY, "--threads", "2", "--repeats", "1", "--warmup", "0", "--json", str(path)])
    assert json.loads(path.read_text()) == results
    assert list(results) == [TINY] and list(results[TINY]) == list(PASSES) == ["fwd", "bwd"]
    for name, row in results[TINY].items():
        assert list(row) == ["one_ms", "side_by_side_ms", "scaling", "best_scan_ratio"]
        assert all(math.isfinite(value) and value > 0 for value in row.values()), (name, row)
        assert row["scaling"] == pytest.approx(2 * row["one_ms"] / row["side_by_side_ms"])
        assert row["best_scan_ratio"] == pytest.approx(1 / row["scaling"])
    table = capsys.readouterr().out
    assert "2_side_by_side_ms" in table and f"{TINY}  fwd" in table and f"{TINY}  bwd" in table


def test_bad_arguments_exit_with_one_line(capsys):
    for argv in (["--threads", "1"], ["--shapes", "T5_B2"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "side by side needs at least 2" in err and "bad shape" in err
