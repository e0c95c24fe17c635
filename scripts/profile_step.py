"""Profile one AR step of a recipe on CUDA and print where the GPU time goes.

Usage (GPU machine):
    python scripts/profile_step.py recipe=self_forcing_wan21_t2v_1_3b_taehv graph=eager \
        attention=sdpa_cudnn model.checkpoint=null text_encoder=random
"""

import sys

from hydra import compose, initialize_config_module
from torch.profiler import ProfilerActivity, profile

from flashdreams.build import build_rollout
from flashdreams.config import schema  # noqa: F401


def main(overrides: list[str]) -> None:
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    rollout = build_rollout(cfg)
    rollout.start([cfg.prompt])
    rollout.precapture()
    for _ in range(min(4, rollout.total_blocks - 1)):  # profile step 4 (or the last one)
        rollout.step(sync=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        rollout.step(sync=True)
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
    )
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
