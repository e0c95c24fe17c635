"""HY-WorldPlay (HY-World 1.5), its Wan2.2-TI2V-5B path: actions, PRoPE, reconstituted memory."""

from flashdreams.model.hy_worldplay.model import HYWorldPlayDiT

__all__ = ["HYWorldPlayDiT"]
