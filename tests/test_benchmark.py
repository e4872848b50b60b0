"""benchmarks/recurrence.py on a tiny shape: the JSON structure, the table and the command line
(a smoke test: no warm-up, one timed pass per measurement, no assertions on timings)."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks import recurrence
from benchmarks.layers import IMPLS, impls_for
from benchmarks.recurrence import METRICS, Shape, format_table, main, parse_shape
from lightning_modules.run.host_memory import glibc_malloc
from tests.conftest import ROOT

TINY = "T5_B2_I3_H4"
QUICK = ["--shapes", TINY, "--repeats", "1", "--warmup", "0"]


def check_results(results: dict, shapes: list[str], impls: list[str]) -> None:
    assert list(results) == shapes
    for shape in shapes:
        assert list(results[shape]) == impls
        for impl in impls:
            row = results[shape][impl]
            assert list(row) == list(METRICS) == ["fwd_bwd_ms", "fwd_ms", "peak_mem_mb"]
            for metric, value in row.items():
                assert type(value) is float and math.isfinite(value) and value > 0, (shape, impl, metric, value)


def test_parse_shape():
    assert parse_shape("T784_B64_I1_H128") == Shape(784, 64, 1, 128)
    assert parse_shape(TINY).name == TINY
    for name in recurrence.DEFAULT_SHAPES["cuda"]:
        assert parse_shape(name).name == name
    for bad in ["T5_B2_I3", "t5_b2_i3_h4", "T0_B2_I3_H4", "T5_B2_I3_H4x", "lstm"]:
        with pytest.raises(ValueError, match="bad shape"):
            parse_shape(bad)


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_main_writes_exact_json_and_prints_table(tmp_path, capfd):
    path = tmp_path / "out" / "bench.json"
    results = main([*QUICK, "--json", str(path)])
    written = json.loads(path.read_text())
    assert written == results
    # Without --impls: every layer that runs on the CPU (the *_triton and *_graphs rows need CUDA).
    check_results(written, [TINY], impls_for("cpu"))
    assert set(impls_for("cpu")) >= {"indrnn", "indrnn_reference", "lstm", "gru", "rnn_tanh", "rnn_relu", "cwrnn",
                                     "leaky", "skip", "jordan", "narx", "tdnn", "cornn", "unicornn", "lem"}
    assert set(IMPLS) - set(impls_for("cpu")) == {name for name in IMPLS if name.endswith(("_triton", "_graphs"))}
    printed = capfd.readouterr()  # at the file descriptors: Kineto writes its banner to fd 2
    assert "USDT:" not in printed.err  # the profiler's banner is filtered out
    out = printed.out
    table = format_table(results)
    assert table in out
    header = table.splitlines()[0].split()
    assert header == ["shape", "impl", "fwd_bwd_ms", "fwd_ms", "peak_mem_mb", "x_vs_lstm", "x_vs_indrnn_reference"]
    rows = [line.split() for line in table.splitlines()[2:] if line]
    assert [row[1] for row in rows] == impls_for("cpu") and all(row[0] == TINY for row in rows)
    lstm_row = next(row for row in rows if row[1] == "lstm")
    assert lstm_row[5] == "1.00x"  # speed-up of lstm relative to itself


def test_peak_memory_reflects_saved_activations():
    # fwd+bwd keeps (T, B, H) activations alive, so the peak grows about linearly with T.
    short = recurrence.measure(IMPLS["indrnn_reference"], Shape(8, 4, 3, 16), torch.device("cpu"), 0, 1, 1.0)
    long = recurrence.measure(IMPLS["indrnn_reference"], Shape(64, 4, 3, 16), torch.device("cpu"), 0, 1, 1.0)
    assert long["peak_mem_mb"] > 4 * short["peak_mem_mb"] > 0
    # At least the output, (T, B, H) float32, is counted.
    assert long["peak_mem_mb"] * 2**20 >= 64 * 4 * 16 * 4


def test_registry_takes_a_new_layer_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(IMPLS, "elman_cell_loop", lambda i, h, device: nn.RNN(i, h, batch_first=True, device=device))
    results = main([*QUICK, "--impls", "elman_cell_loop", "lstm", "--json", str(tmp_path / "b.json")])
    check_results(results, [TINY], ["elman_cell_loop", "lstm"])


def test_bad_arguments_exit_with_one_line(capsys):
    for argv in (["--shapes", "T5_B2"], ["--impls", "nope"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "bad shape" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_requested_without_cuda():
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", *QUICK])
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "CUDA is not available" in message and "\n" not in message


@pytest.mark.slow  # an interpreter start; main() in-process: test_main_writes_exact_json_and_prints_table
def test_command_line(tmp_path):
    path = tmp_path / "cli.json"
    done = subprocess.run([sys.executable, "benchmarks/recurrence.py", *QUICK, "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_results(json.loads(path.read_text()), [TINY], impls_for("cpu"))
    assert "fwd_bwd_ms" in done.stdout and "x_vs_lstm" in done.stdout
    assert "USDT:" not in done.stderr  # the profiler's banner is filtered out
    if glibc_malloc():  # a new process: it keeps freed memory as a training run does, unless told not to
        assert "host memory kept for reuse" in done.stdout
        defaults = subprocess.run([sys.executable, "benchmarks/recurrence.py", *QUICK, "--impls", "indrnn",
                                   "--glibc-malloc-defaults"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert defaults.returncode == 0, defaults.stderr
        assert "host memory glibc defaults" in defaults.stdout


@pytest.mark.parametrize("precision, impls", [("tf32", ["indrnn", "lstm"]), ("bf16", ["indrnn", "indrnn_reference"])])
def test_precision_option_applies_to_every_implementation(precision, impls):
    # (torch's CPU LSTM has no bfloat16 kernel on CPUs without bf16 instructions: not run here under bf16)
    results = main([*QUICK, "--impls", *impls, "--precision", precision])
    check_results(results, [TINY], impls)
    recurrence.set_precision("fp32")  # leave torch's global matmul settings as the other tests expect
