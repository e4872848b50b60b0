"""The Lightning layer: one LightningModule per objective, plus the train/eval pipeline."""
