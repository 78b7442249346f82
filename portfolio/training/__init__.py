"""LoRA training with replay and Learning-without-Forgetting regularisation."""
