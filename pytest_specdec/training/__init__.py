"""Training the model drafters' default weights: distillation data from the bench's
prompts and paradigms, checkpoints, the loop. Above :mod:`..bench` (its data comes from
the paradigms); the drafters read weights through :mod:`..models.weights` only."""
