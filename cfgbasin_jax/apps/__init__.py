"""Command lines around the library: ``generate`` (cfgbasin-generate, the paper's scripts), ``evaluate``,
``demo`` (cfgbasin-demo) and ``plots``."""
