"""Recurrent architectures in pure PyTorch: no Lightning, no Hydra.

Everything here can be imported into plain PyTorch code::

    from src.layers import IndRNN
    from src.networks import RecurrentNetwork
"""
