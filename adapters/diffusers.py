"""diffusers VQModel with FDM."""
