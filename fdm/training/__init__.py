"""Training FDM: phase 2 (sampler-free qe loss) and phase 3 (joint fine-tuning with the decoder)."""
