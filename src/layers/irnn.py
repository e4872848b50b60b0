"""IRNN: a ReLU Elman network with identity recurrent initialisation (Le, Jaitly & Hinton, 2015)."""
from __future__ import annotations

import torch
from torch import nn


class IRNN(nn.RNN):
    """torch.nn.RNN with ReLU units, W_hh = identity * ``identity_scale``, zero biases and small
    Gaussian input weights (std ``input_init_std``), as in Le et al. 2015.

    Same arguments, shapes and return values as :class:`torch.nn.RNN` (``nonlinearity`` is fixed
    to "relu"): input (T, B, I) or (B, T, I) with ``batch_first``; hx and h_n (L*D, B, H).
    """

    def __init__(self, *args, identity_scale: float = 1.0, input_init_std: float = 0.001, **kwargs) -> None:
        if kwargs.setdefault("nonlinearity", "relu") != "relu":
            raise ValueError("IRNN uses ReLU units; use model=rnn for a tanh Elman network")
        self.identity_scale, self.input_init_std = identity_scale, input_init_std
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        # nn.RNN.__init__ calls this; identity_scale and input_init_std are set before it runs.
        for name, param in self.named_parameters():
            if name.startswith("weight_hh"):
                with torch.no_grad():
                    param.copy_(torch.eye(self.hidden_size) * self.identity_scale)
            elif name.startswith("weight_ih"):
                nn.init.normal_(param, 0.0, self.input_init_std)
            else:
                nn.init.zeros_(param)
