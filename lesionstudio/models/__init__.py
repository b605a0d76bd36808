"""The models: the VQ-VAE, the Gated PixelCNN prior, the realism critic, the post-trained decoder,
and the config + safetensors format they share.
"""
