"""What is run: models (trained checkpoints, synthetic presets of public shapes, local paths, hub ids) and prompt sets."""
