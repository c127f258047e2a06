"""Silence exactly the "Flax classes are deprecated" notices of diffusers 0.39 / transformers 4.x.

Those libraries log the notice on every Flax module set-up, which floods sampling logs. Only
records whose message starts with one of the prefixes below are dropped; every other warning
from diffusers and transformers still gets through.
"""

import logging

DEPRECATION_PREFIXES = (
    "Flax classes are deprecated",
    "TensorFlow and JAX classes are deprecated",
)


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEPRECATION_PREFIXES)


_FILTER = _DropFlaxDeprecation()


def silence_flax_deprecation() -> None:
    """Install the filter on the diffusers/transformers library loggers and their handlers."""
    import diffusers.utils.logging as dlog  # noqa: F401  (configures the library root logger)
    import transformers.utils.logging as tlog  # noqa: F401

    dlog.get_logger("diffusers")
    tlog.get_logger("transformers")
    for name in ("diffusers", "transformers"):
        root = logging.getLogger(name)
        for target in [root, *root.handlers]:
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
