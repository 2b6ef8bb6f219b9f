"""Loading Hugging Face checkpoints, presets (the embedded tiny model), trainable-parameter subsets."""
