"""The one error type of weight conversion and loading."""


class ConversionError(ValueError):
    """Bad conversion input: a missing file or folder, a weight that does not fit, a config the Flax
    models cannot honour, an unknown dtype. The message names the file, key or flag at fault."""
