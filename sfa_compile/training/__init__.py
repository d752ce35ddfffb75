"""Fine-tuning SFA models: the Eq. 8 distillation loss, straight-through top-k, attention observers."""
