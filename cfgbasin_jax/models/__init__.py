"""The networks and their checkpoints: our own linen UNet, VAE and CLIP modules (param trees identical
to diffusers' / transformers' Flax classes), their builders from config dicts, the CLIP tokenizer, the
loaders of every format we read or write, and tiny random models for tests."""
