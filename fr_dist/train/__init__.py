"""Training: config, optimisers and schedules, engines, the trainer loop, checkpoints, logging."""
