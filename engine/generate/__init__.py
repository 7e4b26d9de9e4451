"""Generation: the batched sampler and the rollout / evaluation drivers built on it."""
