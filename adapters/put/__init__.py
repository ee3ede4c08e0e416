"""PUT (Liu et al., CVPR 2022) with FDM: P-VQVAE, UQ-Transformer, inpainting."""
