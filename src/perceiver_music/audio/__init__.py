"""The raw-audio path (DESIGN.md section 8): audio data (data.py), the Jukebox VQ-VAE
(vqvae.py) with EMA and residual quantizers (quantize.py), its losses and metrics, and trained
runs as codecs (codec.py). Only data.py is free of torch."""
