"""Fine-tuning and compression recipes (model transforms plus trainer hooks); none are registered yet."""
