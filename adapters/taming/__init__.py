"""taming-transformers (Esser et al., CVPR 2021) with FDM: VQModel, GumbelVQ, Net2NetTransformer."""
