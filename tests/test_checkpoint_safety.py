"""A checkpoint is data, never code (issue 19, section 2): a stored config that names anything but the
project's own building blocks is refused in one line before anything in it is called, by every entry
point that reads a checkpoint (eval.py, generate.py, resume)."""
from __future__ import annotations

import copy
import glob

import pytest
import torch
from hydra.utils import get_object, instantiate

from lightning_modules.run import UserError, evaluate, train
from lightning_modules.run.allowlist import check_checkpoint_config, config_targets, refusal
from lightning_modules.run.build import plain_config
from tests.conftest import CONF, QUICK, compose_eval, compose_train, run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """best.ckpt of a one-epoch adding run with a tiny IndRNN (about 2 s)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(run_dir, QUICK + ["task.max_epochs=1", "model.hidden_size=8", "logger=csv"]))
    return run_dir / "checkpoints" / "best.ckpt"


def poisoned(checkpoint, folder, edit) -> tuple:
    """A copy of ``checkpoint`` whose stored run config ``edit(run_config, marker)`` changed, and the
    marker file the payload would create."""
    marker = folder / "payload-ran"
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    loaded = copy.deepcopy(loaded)
    edit(loaded["hyper_parameters"]["run_config"], str(marker))
    path = folder / "downloaded.ckpt"
    torch.save(loaded, path)
    return path, marker


def in_datamodule(payload):
    return lambda config, marker: config["task"].__setitem__("datamodule", payload(marker))


PAYLOADS = {
    "builtins.open": in_datamodule(lambda m: {"_target_": "builtins.open", "_args_": [m, "w"]}),
    "os.system": in_datamodule(lambda m: {"_target_": "os.system", "_args_": [f"touch {m}"]}),
    "subprocess.Popen": in_datamodule(lambda m: {"_target_": "subprocess.Popen", "_args_": [["touch", m]]}),
    "builtins.exec": in_datamodule(lambda m: {"_target_": "builtins.exec", "_args_": [f"open({m!r}, 'w')"]}),
    "builtins.eval": in_datamodule(lambda m: {"_target_": "builtins.eval", "_args_": [f"open({m!r}, 'w')"]}),
    "functools.partial": in_datamodule(lambda m: {"_target_": "functools.partial", "_args_": [
        {"_target_": "hydra.utils.get_method", "path": "builtins.open"}, m, "w"]}),
    "partial-open": lambda c, m: c["model"].__setitem__("layer", {"_target_": "builtins.open", "_partial_": True,
                                                                  "_args_": [m, "w"]}),
    "nested-in-kwargs": lambda c, m: c["model"]["layer"].__setitem__(
        "options", {"deeper": [1, {"_target_": "builtins.open", "_args_": [m, "w"]}]}),
    "walk-out-of-src": in_datamodule(lambda m: {"_target_": "src.layers.indrnn.torch.os.system",
                                                "_args_": [f"touch {m}"]}),
    "re-exported-os": in_datamodule(lambda m: {"_target_": "datamodules.download.os.system", "_args_": [f"touch {m}"]}),
    "project-function": in_datamodule(lambda m: {"_target_": "datamodules.ntu_convert.convert", "raw": [m], "out": m}),
    "objective-target": lambda c, m: c["objective"].__setitem__("_target_", "subprocess.Popen"),
    "interpolation": lambda c, m: c["model"].__setitem__("hidden_size", "${oc.env:HOME}"),
    "target-not-a-name": in_datamodule(lambda m: {"_target_": ["builtins", "open"], "_args_": [m, "w"]}),
}
NAMED = {"partial-open": "builtins.open", "nested-in-kwargs": "builtins.open", "walk-out-of-src": "torch",
         "re-exported-os": "'os'", "project-function": "datamodules.ntu_convert.convert",
         "objective-target": "subprocess.Popen", "interpolation": "${oc.env:HOME}",
         "target-not-a-name": "a _target_ must be a dotted name, got list"}


def eval_config(tmp_path, ckpt, overrides=()):
    """conf/eval.yaml composed as eval.py would (tests.conftest.compose_eval), logging under ``tmp_path``."""
    return compose_eval(tmp_path / "eval", ckpt, [f"paths.log_dir={tmp_path}", *overrides])


def test_the_payloads_are_real_without_the_allowlist(tmp_path):
    """What the allowlist stops: Hydra alone would create (or empty) the file."""
    marker = tmp_path / "payload-ran"
    instantiate({"_target_": "builtins.open", "_args_": [str(marker), "w"]}).close()
    assert marker.exists()


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_eval_refuses_a_checkpoint_that_names_code_in_one_line_before_any_call(trained, tmp_path, case):
    path, marker = poisoned(trained, tmp_path, PAYLOADS[case])
    with pytest.raises(UserError) as refused:
        evaluate(eval_config(tmp_path, path))
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and NAMED.get(case, case) in message
    assert "a checkpoint is data" in message
    assert not marker.exists() and not (tmp_path / "eval").exists()


def test_generate_and_resume_refuse_it_too(trained, tmp_path):
    from generate import load_language_model
    path, marker = poisoned(trained, tmp_path, PAYLOADS["builtins.open"])
    with pytest.raises(UserError, match="builtins.open"):
        load_language_model(path)
    with pytest.raises(UserError, match="builtins.open"):
        train(compose_train(tmp_path / "resumed", QUICK + ["task.max_epochs=2", "model.hidden_size=8",
                                                           f"ckpt_path={path}"]))
    assert not marker.exists()


@pytest.mark.slow  # an interpreter start (23 s on the loaded 2-core machine)
def test_eval_py_refuses_it_in_one_line(trained, tmp_path):
    path, marker = poisoned(trained, tmp_path, PAYLOADS["os.system"])
    completed = run_script("eval.py", [f"ckpt_path={path}", "trainer=cpu", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(f"error: ckpt_path={path}: its stored config names code") and "os.system" in line
    assert not marker.exists()


def test_every_target_of_conf_is_allowed_and_importable():
    targets = config_targets()
    files = [name for name in glob.glob(str(CONF / "**/*.yaml"), recursive=True)
             if "/hydra/" not in name and "hparams_search" not in name]
    found = {line.split("_target_:")[1].split("#")[0].strip()
             for name in files for line in open(name) if "_target_:" in line}
    assert found <= targets
    for target in targets:
        assert refusal(target) is None
        assert callable(get_object(target)), target
    assert refusal("torch.optim.AdamW") is None and refusal("src.layers.indrnn.IndRNN") is None  # classes by path


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_the_stored_config_of_every_model_passes(tmp_path, model):
    check_checkpoint_config(plain_config(compose_train(tmp_path / "run", [f"model={model}"])))


@pytest.mark.parametrize("extra", [["task=ptb_char"], ["task=reverse", "model=gru"],
                                   ["learning=rtrl", "model.layer.batch_norm=none"],
                                   ["callbacks=official_indrnn", "scheduler=plateau"],
                                   ["experiment=indrnn_ntu_cs_6layer"]])
def test_the_stored_config_of_tasks_objectives_and_experiments_passes(tmp_path, extra):
    check_checkpoint_config(plain_config(compose_train(tmp_path / "run", extra)))
