from flashdreams.config import schema  # noqa: F401  (compose("run") finds the base_* schemas)
