"""sora_model: the model layer on sora_kernels (video autoencoder, diffusion transformer over
packed spacetime patches, text conditioning, flow-matching training and sampling).

Empty for now: the kernels it will call live in sora_kernels.
"""
