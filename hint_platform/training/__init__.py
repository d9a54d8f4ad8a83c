"""Training: Ray Train (V2) + FSDP2 workers, checkpoints, resume, the export (driver.py is the
entry point: `fit(cfg)`)."""
