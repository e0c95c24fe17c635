"""Matrix-Game 2.0 (Skywork): Wan 2.1 1.3B causal DiT with keyboard / mouse action modules."""

from flashdreams.model.matrix_game.action import ActionModule
from flashdreams.model.matrix_game.model import MatrixGameBlock, MatrixGameDiT

__all__ = ["ActionModule", "MatrixGameBlock", "MatrixGameDiT"]
