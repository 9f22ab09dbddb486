"""ImageBind: the model, its presets, and preprocessing for every modality."""
