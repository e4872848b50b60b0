"""The TensorBoard HParams entry of a run: its settings with its final metrics (results.json itself is
:mod:`lightning_modules.run.record`'s)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

HPARAM_GROUPS = ("model", "task", "objective", "optimizer", "scheduler")

# The metrics any objective of the project logs (HParams columns), per stage, with the monitors' _best.
_METRICS = ("loss", "mse", "acc", "seq_acc", "loss_ratio", "bpc", "ppl")
PROJECT_METRICS = tuple(f"{stage}/{name}" for stage in ("val", "test") for name in _METRICS) + tuple(
    f"val/{name}_best" for name in _METRICS)


def flatten_hparams(cfg: DictConfig) -> dict:
    """The run's model/task/optimizer/scheduler settings as flat {"model/hidden_size": 128, ...}."""
    flat: dict = {"seed": cfg.get("seed")}

    def visit(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("_partial_",):
                    visit(f"{prefix}/{key}", value)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    for group in HPARAM_GROUPS:
        if cfg.get(group) is not None:
            visit(group, OmegaConf.to_container(cfg[group], resolve=True))
    return flat


def log_hparams(loggers: list, cfg: DictConfig, results: dict) -> None:
    """Record the hyper-parameters with the final metrics for TensorBoard's HParams tab (and CSV)."""
    params = flatten_hparams(cfg)
    # Every run declares the project's whole set of metric columns: TensorBoard's HParams tab takes its
    # columns from one run, so a folder mixing tasks would otherwise lose the other tasks' metrics.
    own = [k for k, v in results.items() if k.startswith(("val/", "test/")) and isinstance(v, float)]
    metric_names = sorted(set(own) | set(PROJECT_METRICS))
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "_get_file_writer"):  # TensorBoard's SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            # The metric columns read the scalars already logged under these tags; rewriting them
            # here would add a second point at another step.
            exp, ssi, sei = hparams(params, {name: results.get(name, float("nan")) for name in metric_names})
            # Lightning closes the writer after testing; _get_file_writer reopens it in the same folder.
            file_writer = experiment._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
            experiment.close()
        else:
            logger.log_hyperparams(params)
            logger.save()
