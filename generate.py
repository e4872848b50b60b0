"""Sample text from a trained language model, streaming it to the terminal.

    python generate.py ckpt_path=outputs/<run>/checkpoints/best.ckpt prompt="the company" length=50 \
        temperature=0.8 seed=1

The checkpoint (train.py's, loaded with ``weights_only=True``) holds the run's config and the
vocabulary as a plain list, so nothing else is needed: no data files. The prompt is split like the
training text: into words (word level; unknown words become ``<unk>``) or into characters (char
level; a space is the ``_`` between words). A prompt of several lines (``\\n``) ends each with
``<eos>``; an empty prompt starts after an ``<eos>``. Output: words joined by spaces, characters
with ``_`` shown as a space, ``<eos>`` as a new line. ``temperature=0`` picks the likeliest token.
Arguments are ``key=value`` as every entry point's (tools/cli.py); ``--help`` lists them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from datamodules.ptb import EOS, UNK, saved_vocabulary  # noqa: E402
from tools.cli import CommandLineError, Option, as_float, as_int, help_text, parse, wants_help  # noqa: E402
from lightning_modules.language_model import LanguageModel, sample  # noqa: E402
from lightning_modules.run import UserError  # noqa: E402
from lightning_modules.run.build import build_network, build_objective  # noqa: E402
from lightning_modules.run.checkpoints import load_our_checkpoint  # noqa: E402

COMMAND = "generate.py"
SUMMARY = "Sample text from a language model trained by train.py (task=ptb_char or ptb_word)."
OPTIONS = (
    Option("ckpt_path", None, "the checkpoint: outputs/<run>/checkpoints/best.ckpt", required=True, metavar="PATH"),
    Option("prompt", "", "text the sample continues (empty: start after an end of sentence)", metavar="TEXT"),
    Option("length", 200, "tokens to sample", as_int),
    Option("temperature", 1.0, "softmax temperature; 0 picks the likeliest token", as_float),
    Option("seed", 0, "seeds the sampling", as_int),
    Option("device", "cpu", "cpu, cuda or cuda:N"),
)


def torch_device(device: str) -> torch.device:
    """``device`` as a torch.device that exists here, or a one-line UserError."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"device={device} is not a device name; use device=cpu, cuda or cuda:N") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device}: this machine has no CUDA device torch can use; use device=cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise UserError(f"device={device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1})")
    if chosen.type not in ("cpu", "cuda"):
        raise UserError(f"device={device}: generate.py runs on cpu or cuda")
    return chosen


def load_language_model(ckpt_path: str | os.PathLike, device: str = "cpu") -> LanguageModel:
    """The trained :class:`LanguageModel` of a checkpoint, in eval mode, with its ``vocabulary``; the
    checkpoint's stored config is checked against the allowlist before anything is built."""
    device = torch_device(str(device))
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"ckpt_path: no checkpoint at {path} (pass outputs/<run>/checkpoints/best.ckpt)")
    checkpoint = load_our_checkpoint(path)
    stored = checkpoint["hyper_parameters"]["run_config"]
    cfg = OmegaConf.create(stored)
    model = build_objective(cfg, build_network(cfg), dict(stored))
    if not isinstance(model, LanguageModel):
        raise UserError(f"ckpt_path: {path} is a {type(model).__name__} run, not a language model")
    model.load_state_dict(checkpoint["state_dict"])
    vocabulary = saved_vocabulary(checkpoint)
    if vocabulary is None:
        raise UserError(f"ckpt_path: {path} holds no vocabulary (its DataModule saved none)")
    model.vocabulary = vocabulary
    return model.to(device).eval()


def encode_prompt(prompt: str, vocabulary: list[str], level: str) -> list[int]:
    """Token ids of ``prompt`` (see the module docstring); ``[<eos>]`` for an empty prompt."""
    index = {token: position for position, token in enumerate(vocabulary)}
    tokens: list[str] = [EOS]
    for number, line in enumerate(prompt.split("\n")):
        if number > 0:
            tokens.append(EOS)
        if level == "word":
            tokens.extend(line.split())
        else:
            tokens.extend("_" if character == " " else character for character in line.strip())
    unknown = [token for token in tokens if token not in index]
    if unknown and UNK not in index:
        raise UserError(f"prompt: {unknown[0]!r} is not in the model's vocabulary of {len(vocabulary)} tokens")
    return [index.get(token, index.get(UNK)) for token in tokens]


def render(token: str, level: str) -> str:
    """How one sampled token is printed."""
    if token == EOS:
        return "\n"
    if level == "word":
        return token + " "
    return " " if token == "_" else token


def generate(ckpt_path: str, prompt: str = "", length: int = 200, temperature: float = 1.0, seed: int = 0,
             device: str = "cpu", out=sys.stdout) -> list[str]:
    """Write ``length`` sampled tokens to ``out`` as they come; return them."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise UserError(f"length must be a positive integer, got {length!r}")
    model = load_language_model(ckpt_path, device)
    vocabulary = model.vocabulary
    generator = torch.Generator().manual_seed(int(seed))
    out.write(prompt)
    tokens = []
    for token_id in sample(model, encode_prompt(str(prompt), vocabulary, model.level), length, float(temperature),
                           generator):
        token = vocabulary[token_id]
        tokens.append(token)
        out.write(render(token, model.level))
        out.flush()
    out.write("\n")
    return tokens


def main(argv: list[str]) -> int:
    """The ``generate.py`` command: 0 after sampling, 1 on a bad checkpoint or value, 2 on a bad command line."""
    if wants_help(argv):
        print(help_text(COMMAND, SUMMARY, OPTIONS))
        return 0
    try:
        args = parse(argv, OPTIONS, COMMAND, bare_means="ckpt_path")
    except CommandLineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        generate(**args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
