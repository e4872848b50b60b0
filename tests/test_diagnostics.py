"""Diagnostics callback: its gradient-through-time numbers against autograd, and a real sweep read
back through a real TensorBoard server's HTTP API."""
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from lightning_modules.diagnostics import RecurrentDiagnostics, recurrent_layers
from src.layers import IndRNN
from src.networks import RecurrentNetwork
from tests.conftest import ROOT, run_script


@pytest.mark.parametrize("layer", [functools.partial(IndRNN, u_bound=1.0), torch.nn.LSTM])
def test_gradient_through_time_matches_autograd(layer):
    torch.manual_seed(0)
    net = RecurrentNetwork(layer, input_size=3, output_size=1, hidden_size=8, num_layers=2)
    inputs = torch.randn(4, 15, 3)
    assert list(recurrent_layers(net)) == ["layers.0", "layers.1"]

    callback = RecurrentDiagnostics(every_n_steps=1)
    callback.on_fit_start(None, net)
    callback._mode = "grad"
    net.train()
    prediction, _ = net(inputs)
    prediction.square().sum().backward()
    callback.on_fit_end(None, net)

    # The same quantities by plain autograd: dL/dx_t of the network input, and of layer 1's input.
    x = inputs.clone().requires_grad_(True)
    layer0_out, _ = net.layers[0](x)
    layer0_out.retain_grad()
    net.dropout(layer0_out)
    head_in, _ = net.layers[1](layer0_out)
    net.head(head_in[:, -1]).square().sum().backward()
    expected = {"layers.0": x.grad, "layers.1": layer0_out.grad}
    for name, grad in expected.items():
        per_step = grad.pow(2).sum(dim=(0, 2)).sqrt()
        torch.testing.assert_close(callback._grad_norms[name], per_step, rtol=1e-5, atol=1e-8)
    # The gradient reaches every step of the first layer's input, and the hooks are gone afterwards.
    assert (callback._grad_norms["layers.0"] > 0).all()
    assert not net.layers[0]._forward_pre_hooks and not net.layers[0]._forward_hooks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"X-XSRF-Protected": "1",
                                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_diagnostics_of_a_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_script("train.py", [
        "-m", "model=indrnn,cwrnn,leaky_rnn", "model.hidden_size=16", "task.seq_len=20",
        "task.datamodule.train_size=64", "task.datamodule.val_size=32", "task.datamodule.test_size=32",
        "task.datamodule.batch_size=16", "task.max_epochs=2", "task.stop_at=null", "trainer=cpu",
        "trainer.enable_model_summary=false", "callbacks=[default,diagnostics]", "callbacks.diagnostics.every_n_steps=2",
        f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir",
                               str(sweep_dir), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
                               "--reload_interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=ROOT)
    base = f"http://127.0.0.1:{port}/data"
    runs = {f"{job}/tensorboard" for job in ("0_adding_indrnn", "1_adding_cwrnn", "2_adding_leaky_rnn")}
    try:
        deadline = time.monotonic() + 120
        scalars = {}
        while time.monotonic() < deadline:
            try:
                scalars = _get(f"{base}/plugin/scalars/tags")
                if runs <= set(scalars) and all("test/mse" in scalars[run] for run in runs):
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            time.sleep(1)
        assert runs <= set(_get(f"{base}/runs")), scalars
        images = _get(f"{base}/plugin/images/tags")
        histograms = _get(f"{base}/plugin/histograms/tags")
        for run in runs:
            assert {"grad_norm/net.layers.0", "grad_norm/net.head", "grad_h/net.layers.0/first_over_last",
                    "val/mse", "test/mse"} <= set(scalars[run])
            assert {"grad_h/norm_vs_t", "activity/net.layers.0"} <= set(images[run])
        indrnn, cwrnn, leaky = (f"{job}/tensorboard" for job in ("0_adding_indrnn", "1_adding_cwrnn", "2_adding_leaky_rnn"))
        assert {"u/net.layers.0.recurrence", "u/net.layers.1.recurrence"} <= set(histograms[indrnn])
        assert {f"clockwork/net.layers.0/period_{p}" for p in (1, 2, 4, 8)} <= set(histograms[cwrnn])
        assert "alpha/net.layers.0" in histograms[leaky]
        # 8 training steps, a diagnostic step every 2: steps 0, 2, 4, 6.
        points = _get(f"{base}/plugin/scalars/scalars?run={indrnn}&tag=grad_h/net.layers.0/first_over_last")
        assert [point[1] for point in points] == [0, 2, 4, 6] and all(point[2] > 0 for point in points)
        # One image per diagnostic step, decodable PNG.
        entries = _get(f"{base}/plugin/images/images?run={indrnn}&tag=grad_h/norm_vs_t&sample=0")
        assert [entry["step"] for entry in entries] == [0, 2, 4, 6]
        image_url = f"{base}/plugin/images/individualImage?{entries[-1]['query']}"
        with urllib.request.urlopen(image_url, timeout=10) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"
        # HParams: every run with its hyper-parameters and final metrics.
        experiment = _get(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert {"model/hidden_size", "seed"} <= hparams and {"test/mse", "val/mse_best"} <= metrics
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
