"""One command-line convention for every entry point (issue 19, section 5): key=value arguments as
Hydra's, --help everywhere, one line for an unknown key (listing the accepted ones), a bad value, a
bare argument (shown whole: a checkpoint keeps its .ckpt) or generate.py's device=cuda without CUDA."""
from __future__ import annotations

import pytest
import torch

import generate
import prepare_ntu
import results
from tools.cli import CommandLineError, Option, as_bool, as_float, as_int, help_text, parse
from tests.conftest import run_script

OPTIONS = (Option("ckpt_path", None, "a checkpoint", required=True, metavar="PATH"),
           Option("length", 200, "tokens", as_int), Option("temperature", 1.0, "softmax temperature", as_float),
           Option("overwrite", False, "replace", as_bool))


def test_values_are_taken_as_written_and_converted_by_their_option():
    args = parse(["ckpt_path=outputs/run.v2/best.ckpt", "length=7", "overwrite=true"], OPTIONS, "x.py")
    assert args == {"ckpt_path": "outputs/run.v2/best.ckpt", "length": 7, "temperature": 1.0, "overwrite": True}
    assert parse(["ckpt_path=a=b.ckpt"], OPTIONS, "x.py")["ckpt_path"] == "a=b.ckpt"  # split at the first =


@pytest.mark.parametrize("argv, line", [
    (["ckpt_path=a.ckpt", "lenght=3"], "unknown argument 'lenght=3'; x.py accepts ckpt_path, length, temperature, "
                                       "overwrite (python x.py --help)"),
    (["outputs/run/best.ckpt"], "'outputs/run/best.ckpt' is not key=value; did you mean "
                                "ckpt_path=outputs/run/best.ckpt? x.py accepts ckpt_path, length, temperature, "
                                "overwrite"),
    (["ckpt_path=a.ckpt", "length=many"], "length must be an integer, got 'many'"),
    (["ckpt_path=a.ckpt", "overwrite=maybe"], "overwrite must be true or false, got 'maybe'"),
    (["ckpt_path=a.ckpt", "length=1", "length=2"], "length is given twice (length=1 and length=2); give it once"),
    (["length=2"], "ckpt_path=PATH is required: a checkpoint (python x.py --help)"),
])
def test_bad_command_lines_are_one_line(argv, line):
    with pytest.raises(CommandLineError) as error:
        parse(argv, OPTIONS, "x.py", bare_means="ckpt_path")
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


def test_help_lists_every_option_with_its_default():
    text = help_text("x.py", "Does x.", OPTIONS)
    assert text.splitlines()[0] == "usage: python x.py ckpt_path=PATH [key=value ...]"
    assert all(f"  {usage}" in text for usage in ("ckpt_path=PATH", "length=200", "temperature=1.0", "overwrite=false"))


@pytest.mark.parametrize("module", [generate, prepare_ntu, results])
def test_entry_points_take_help(module, capsys):
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python {module.COMMAND} ") and all(option.key in out for option in module.OPTIONS)


@pytest.mark.parametrize("argv, code, line", [
    (["outputs/x/checkpoints/best.ckpt"], 2, "error: 'outputs/x/checkpoints/best.ckpt' is not key=value; did you mean "
                                             "ckpt_path=outputs/x/checkpoints/best.ckpt?"),
    (["ckpt_path=x.ckpt", "lenght=5"], 2, "error: unknown argument 'lenght=5'; generate.py accepts ckpt_path, prompt, "
                                          "length, temperature, seed, device"),
    (["ckpt_path=/nonexistent/best.ckpt"], 1, "error: ckpt_path: no checkpoint at /nonexistent/best.ckpt"),
    (["ckpt_path=x.ckpt", "device=tpu9"], 1, "error: device=tpu9 is not a device name; use device=cpu, cuda or cuda:N"),
])
def test_generate_command_line_errors_are_one_line(argv, code, line, capsys):
    assert generate.main(argv) == code
    (printed,) = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(capsys):
    assert generate.main(["ckpt_path=/nonexistent/best.ckpt", "device=cuda"]) == 1
    assert capsys.readouterr().err.strip() == "error: device=cuda: this machine has no CUDA device torch can use; " \
                                              "use device=cpu"


def test_prepare_ntu_bare_argument_and_unknown_key(capsys):
    assert prepare_ntu.main(["nturgbd_skeletons_s001_to_s017.zip"]) == 2
    assert "did you mean raw=nturgbd_skeletons_s001_to_s017.zip?" in capsys.readouterr().err
    assert prepare_ntu.main(["raw=x", "out=y.h5", "progres=false"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unknown argument 'progres=false'; prepare_ntu.py accepts raw, out, workers")


@pytest.mark.parametrize("argv, line", [
    (["outputs/multirun/x"], "error: 'outputs/multirun/x' is not key=value; did you mean dir=outputs/multirun/x? "
                             "results.py accepts dir, group_by, metrics, plot, out, paper"),
    (["dir=a,b"], "error: dir=a,b: one folder (several only with paper=true)"),
    (["dir=/nonexistent/sweep"], "error: dir: /nonexistent/sweep is not a folder"),
    (["paper=true", "dir=/nonexistent/sweep"], "error: dir: /nonexistent/sweep is not a folder"),
    (["dir=x", "--group-by", "seed"], "error: '--group-by' is not key=value; did you mean group_by=...? "),
])
def test_results_command_line_errors_are_one_line(argv, line, capsys):
    assert results.main(argv) == 2
    (printed,) = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(line)


def test_prepare_ntu_help_from_the_shell_is_quick_and_complete():
    completed = run_script("prepare_ntu.py", ["--help"], timeout=60)  # the standard library only: no torch import
    assert completed.returncode == 0 and "overwrite=false" in completed.stdout and not completed.stderr


@pytest.mark.slow  # three interpreter starts with torch and Lightning
@pytest.mark.parametrize("script, expected", [("generate.py", "usage: python generate.py ckpt_path=PATH"),
                                              ("train.py", "== Config =="),
                                              ("eval.py", "eval.py: test a checkpoint that train.py wrote")])
def test_every_entry_point_takes_help_from_the_shell(script, expected):
    completed = run_script(script, ["--help"], timeout=180)
    assert completed.returncode == 0 and expected in completed.stdout, completed.stderr[-2000:]
