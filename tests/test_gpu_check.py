"""benchmarks/gpu_check.py on the CPU with tiny sizes (`--device cpu --quick`), in-process: every section
runs or says why it is skipped, the targets table names every target of the issue, and the JSON holds
what was printed. The Triton sections are skipped here (triton was imported without the interpreter);
they run in the slow test's own process, as `make gpu-check ARGS="--device cpu --quick"` runs them."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu_check
from tests.conftest import run_script


def test_quick_cpu_run_in_process(tmp_path, capsys):
    path = tmp_path / "check.json"
    results = gpu_check.main(["--device", "cpu", "--quick", "--sections", "kernels", "indrnn_bandwidth", "recurrence",
                              "--impls", "rnn_tanh", "cwrnn", "leaky_graphs", "tdnn", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results, default=str))
    for section in ("kernels", "indrnn_bandwidth"):
        assert results[section] == {"skipped": gpu_check.kernels_can_run(gpu_check.torch.device("cpu"))}
    table = results["recurrence"]["fp32"]["T12_B4_I2_H16"]
    assert list(table) == ["rnn_tanh", "cwrnn", "tdnn", "leaky_graphs"]  # the registry's order
    assert all(math.isfinite(row["fwd_bwd_ms"]) and row["fwd_bwd_ms"] > 0 for row in table.values())
    names = [row["target"] for row in results["targets"]]
    assert "indrnn_pmnist_6layer ms/step through train.py, CUDA graphs" in names
    assert any(name.startswith("lstm / indrnn at T1024_B128_I512_H512 bf16") for name in names)
    assert all(row["status"] == "not measured" for row in results["targets"])  # no CUDA shape was run
    out = capsys.readouterr().out
    assert "== targets" in out and "T12_B4_I2_H16  tdnn" in out


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match=r"unknown --impls \['nope'\]"):
        gpu_check.run_recurrence(gpu_check.torch.device("cpu"), True, gpu_check.Budget(10), ["nope"])


@pytest.mark.slow
def test_whole_quick_cpu_run_as_a_user_runs_it(tmp_path):
    # The script itself (its own process sets TRITON_INTERPRET=1, so the Triton kernels run under the
    # interpreter): every section, every layer, every kernel within tolerance.
    path = tmp_path / "check.json"
    completed = run_script("benchmarks/gpu_check.py", ["--device", "cpu", "--quick", "--json", str(path)], timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads(path.read_text())
    kernels = results["kernels"]
    assert kernels and all(isinstance(v, dict) for v in kernels.values()), kernels
    assert "rows" in results["indrnn_bandwidth"]
    assert all(isinstance(v, dict) for v in results["train_step"].values()), results["train_step"]
    failures = [f"{s} {i}: {r}" for s, rows in results["recurrence"]["fp32"].items() for i, r in rows.items()
                if not isinstance(r, dict)]
    assert not failures, failures
