"""The training stack every training stage shares: one LightningModule, the data modules, one trainer builder."""
