"""MNIST through train.py's and eval.py's runs: download from a (local) mirror, train, permutation in
checkpoints, the offline error. The data are tiny files in the real IDX format (tests/mnist_files.py)."""
import json

import pytest
import torch

from datamodules.mnist import make_permutation
from lightning_modules.run import UserError, evaluate, train
from tests.conftest import compose_eval, compose_train, run_script
from tests.mnist_files import serve_directory, write_tiny_mnist

QUICK_TRAINER = ["trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]


def md5_override(md5: dict) -> str:
    return "task.datamodule.md5={" + ",".join(f"{name}:{value}" for name, value in md5.items()) + "}"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local HTTP mirror serving tiny MNIST files: (base URL, {file: md5})."""
    served = tmp_path_factory.mktemp("mirror")
    md5 = write_tiny_mnist(served, train=400, test=100)
    with serve_directory(served) as url:
        yield url, md5


@pytest.mark.slow  # 600 steps; make test: the download in the pmnist test below, classification learning in
# tests/test_objectives.py, mnist_rows through train() in tests/test_train.py
def test_mnist_rows_downloads_and_learns(mirror, tmp_path):
    url, md5 = mirror
    cfg = compose_train(tmp_path / "run", ["task=mnist_rows", f"paths.data_dir={tmp_path / 'data'}",
                                           f"task.datamodule.mirrors=[{url}]", md5_override(md5),
                                           "task.max_epochs=30", "task.datamodule.batch_size=20", *QUICK_TRAINER])
    best = train(cfg)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(md5)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["task"] == "mnist_rows"
    assert results["test/acc"] > 0.5, results  # chance is 0.1
    assert best == pytest.approx(results["val/acc_best"])


def test_pmnist_permutation_is_stored_in_checkpoints_and_eval_reuses_it(mirror, tmp_path, capsys):
    url, md5 = mirror
    overrides = ["task=pmnist", f"paths.data_dir={tmp_path / 'data'}", f"task.datamodule.mirrors=[{url}]",
                 md5_override(md5), "task.max_epochs=1", "task.datamodule.permutation_seed=7",
                 "model.hidden_size=16", *QUICK_TRAINER]
    train(compose_train(tmp_path / "run", overrides))
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(md5)  # downloaded, no .part
    checkpoint_path = tmp_path / "run" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert torch.equal(checkpoint["MNISTDataModule"]["permutation"], make_permutation(7))
    capsys.readouterr()
    evaluate(compose_eval(tmp_path / "eval", checkpoint_path))  # eval.py's run, in this process
    assert "test metrics: test/acc=" in capsys.readouterr().out


def test_offline_without_data_fails_with_one_line(tmp_path):
    # The UserError that train.py prints as its one line (tests/test_train.py runs that at the command line).
    with pytest.raises(UserError) as error:
        train(compose_train(tmp_path / "logs" / "run", ["task=smnist", f"paths.data_dir={tmp_path}",
                                                         "task.datamodule.mirrors=[http://127.0.0.1:9/mnist]"]))
    last = str(error.value)
    assert last.startswith("cannot download the MNIST files train-images-idx3-ubyte.gz") and "\n" not in last
    assert str(tmp_path / "mnist") in last and "http://127.0.0.1:9/mnist" in last


@pytest.mark.slow  # two DDP processes started by train.py: about 40 s on 2 cores
def test_ddp_cpu_downloads_once_and_trains(tmp_path):
    served, requests = tmp_path / "mirror", []
    served.mkdir()
    md5 = write_tiny_mnist(served, train=200, test=60)
    with serve_directory(served, requests) as url:
        completed = run_script("train.py", [
            "task=pmnist", "trainer=ddp_cpu", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path}",
            f"task.datamodule.mirrors=[{url}]", md5_override(md5), "task.max_epochs=1", "model.hidden_size=16",
            "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(requests) == sorted(f"/{name}" for name in md5), "each file is fetched once, by one rank"
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(md5)  # no .part left
    (results,) = tmp_path.glob("*/*_pmnist_indrnn/results.json")
    assert json.loads(results.read_text())["status"] == "finished"
