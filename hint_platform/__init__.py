"""The HINT platform: training (Ray Train + FSDP2), evaluation, tracking and the registry
(MLflow), tuning (Ray Tune), serving, cluster jobs, recipes (the demo) and the `hint` CLI, one
sub-package each. ARCHITECTURE.md at the repository root maps who owns what."""
