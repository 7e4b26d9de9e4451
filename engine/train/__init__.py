"""Offline training: rollout parsing, batching, the training config, the trainer, the optimizer,
reference log-probs and training checkpoints."""
