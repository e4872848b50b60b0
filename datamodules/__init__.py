"""One LightningDataModule per benchmark."""
