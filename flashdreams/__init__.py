"""flashdreams: fast streaming inference of autoregressive video diffusion and world models."""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """A user-facing configuration error; the CLI prints it as one line naming the setting."""


def __getattr__(name: str):
    """Lazy exports: ``import flashdreams`` stays free of torch."""
    if name == "Session":
        from flashdreams.session import Session

        return Session
    raise AttributeError(f"module 'flashdreams' has no attribute {name!r}")
