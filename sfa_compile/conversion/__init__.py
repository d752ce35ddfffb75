"""Offline conversion of dense models into SFA models: Hugging Face and plain modules, calibration of the
projections R, checkpoints."""
