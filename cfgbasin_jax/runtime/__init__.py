"""Process-level runtime settings for large models: JAX's persistent compilation cache, on by default
(``compile_cache``), and returning freed host memory to the OS between sampling and decoding
(``memory``)."""
