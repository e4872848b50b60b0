"""The Lightning layer: one LightningModule per objective (base, classification, regression, labelling,
seq2seq, language_model, ...), their callbacks, and the run driver (lightning_modules/run/) behind
train.py and eval.py."""
