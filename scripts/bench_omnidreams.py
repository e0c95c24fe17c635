"""OmniDreams single view on the GPU: ``flashdreams-bench`` of the recipe(s) at 704x1280 with random
weights and no downloads, driven by a synthetic HDMap clip (lane lines and boxes drawn here,
30 fps) and a first frame. Prints per AR block (8 video frames) the median HDMap encode
(``control``), DiT (``diffuse``), decode, commit and total (block period) in ms, the floor and
floor / measured, then one JSON line with the same numbers per recipe (also ``OUT/summary.json``).

GPU:  python scripts/bench_omnidreams.py --out results/omnidreams
      python scripts/bench_omnidreams.py --recipe omnidreams_single_view -- graph=cuda_graph
      python scripts/bench_omnidreams.py --recipe omnidreams_single_view_fast -- precision=fp8
      ... -- precision=fp8 rollout.prefetch_control=true rollout.overlap_decode=true
(``prefetch_control``: the next block's HDMap encode on a side stream beside the DiT; the
summary's ``hdmap_ahead`` is that hidden work, ``hdmap_encode`` what is left on the critical path)
(overrides after ``--`` reach every run; the HDMap encoder follows ``graph=``: compiled and
captured per steady block under the recipes' ``compile_cuda_graph``, eager with ``graph=eager``)
      ... --profile   (then one steady block per recipe under the torch profiler: time per kernel class)
CPU smoke (tiny model, 64x64): python scripts/bench_omnidreams.py --tiny --out /tmp/od [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("omnidreams_single_view_fast", "omnidreams_single_view", "omnidreams_single_view_taehv")
DEFAULT = RECIPES[:2]  # the faithful recipes; the TAEHV-encoder one on request
RANDOM = ["model.checkpoint=null", "text_encoder=random", "vae.checkpoint=null",
          "control.encoder.checkpoint=null", "conditioner.encoder.checkpoint=null"]  # fmt: skip
TINY = ["model=omnidreams_tiny", "device=cpu", "dtype=float32", "graph=eager", "attention=sdpa",
        "vae=preview", "conditioner.encoder.base_dim=8", "control.encoder.dtype=float32"]  # fmt: skip


def tiny_encoder(recipe: str) -> str:
    """The tiny HDMap encoder's width override (TAEHV's ``width``, the Wan encoders' ``base_dim``)."""
    return "control.encoder.width=8" if recipe.endswith("_taehv") else "control.encoder.base_dim=8"


def hdmap_frame(k: int, width: int, height: int) -> np.ndarray:
    """A rendered-HD-map-like frame: road edges to a vanishing point, a moving dashed centre
    line, two boxes drifting (what the encoder sees is as costly as a real map's)."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    vx, vy, w = width // 2, height // 3, max(1, width // 200)
    for x in (width // 8, 7 * width // 8):
        draw.line([(x, height), (vx, vy)], fill=(255, 255, 255), width=w)
    for i in range(12):  # dashes moving towards the viewer
        t0, t1 = ((i + k / 8) % 12) / 12, ((i + 0.5 + k / 8) % 12) / 12
        if t1 > t0:
            y0, y1 = vy + (height - vy) * t0**2, vy + (height - vy) * t1**2
            draw.line([(vx, y0), (vx, y1)], fill=(255, 200, 0), width=w)
    for j, colour in enumerate(((0, 120, 255), (255, 0, 80))):
        x = int(width * (0.3 + 0.4 * j) + (k % 60) * (1 - 2 * j) * width / 600)
        s = height // (8 + 4 * j)
        draw.rectangle([x, height // 2, x + s, height // 2 + s], outline=colour, width=w)
    return np.asarray(img)


def make_inputs(root: Path, frames: int, width: int, height: int) -> tuple[Path, Path]:
    """The HDMap mp4 (30 fps) and the first-frame PNG."""
    sys.path.insert(0, str(ROOT))
    from flashdreams.io.video import Mp4Writer

    video, image = root / "bench_hdmap.mp4", root / "first_frame.png"
    with Mp4Writer(video, fps=30) as writer:
        for k in range(frames):
            writer.write(hdmap_frame(k, width, height)[None])
    Image.fromarray(hdmap_frame(0, width, height) // 2 + 64).save(image)
    return video, image


def _ahead_ms(steps: list[dict]) -> float:
    """Median ms of the HDMap encodes queued ahead (``rollout.prefetch_control``) over the
    steps >= 2 that queued one (the last block has no next one); 0 without the option."""
    ahead = [s["control_ahead_ms"] for s in steps if s["step"] >= 2 and "control_ahead_ms" in s]
    return float(np.median(ahead)) if ahead else 0.0


def _run_args(recipe: str, video: Path, image: Path, blocks: int, size: tuple[int, int],
              extra: list[str]) -> list[str]:  # fmt: skip
    """The overrides of one recipe's run on the bench's inputs (random weights, no downloads)."""
    weights = [a for a in RANDOM if not (a.startswith("vae.") and "vae=preview" in extra)]
    return [f"recipe={recipe}", *weights, f"image={image}", f"control.video={video}",
            f"rollout.total_blocks={blocks}", f"rollout.height={size[1]}",
            f"rollout.width={size[0]}", *extra]  # fmt: skip


def profile(recipe: str, out: Path, video: Path, image: Path, blocks: int,
            size: tuple[int, int], extra: list[str]) -> None:  # fmt: skip
    """One steady block of ``recipe`` under the torch profiler (``scripts/profile_step.py``),
    the same inputs and overrides as its bench run."""
    args = [f"--json={out / f'{recipe}_profile.json'}", f"--warm={max(1, min(4, blocks - 2))}",
            *_run_args(recipe, video, image, blocks, size, extra)]  # fmt: skip
    print(f"== {recipe}: profile_step.py {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), *args], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                       str(ROOT), os.environ.get("PYTHONPATH")]))})  # fmt: skip


def run(recipe: str, out: Path, video: Path, image: Path, blocks: int, size: tuple[int, int],
        extra: list[str]) -> dict:  # fmt: skip
    """One ``flashdreams-bench`` process; returns its per-block summary."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flashdreams.cli import bench_main; bench_main()"
    args = [*_run_args(recipe, video, image, blocks, size, extra),
            f"hydra.run.dir={out / recipe}"]  # fmt: skip
    print(f"== {recipe}: flashdreams-bench {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    bench = json.loads((out / recipe / "bench.json").read_text())
    summary = bench["stats"]["summary"]
    row = {"recipe": recipe, "height": size[1], "width": size[0], "blocks": blocks,
           "per_block_ms": {"hdmap_encode": bench["stages_ms"]["control"],
                            "dit": bench["stages_ms"]["diffuse"],
                            "decode": bench["stages_ms"]["decode"],
                            "commit": bench["stages_ms"]["commit"],
                            "total": bench["stages_ms"]["period"],
                            "step_latency": bench["stages_ms"]["step"],
                            "hdmap_ahead": _ahead_ms(bench["stats"]["steps"])},
           "fps": 8 * 1000.0 / bench["stages_ms"]["period"],  # 8 video frames per block
           "warmup_s": summary["warmup_s"], "peak_gib": summary["peak_memory_bytes"] / 2**30}  # fmt: skip
    if "floor" in bench:
        row["floor_ms"] = bench["floor"]["median_floor_ms"]
        row["floor_over_measured"] = bench["floor"]["floor_over_measured"]
        row["floor_over_dit"] = bench["floor"]["floor_over_diffuse"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", choices=RECIPES,
                        help="recipe(s) to run (default: the fast one, then the release's; "
                        "omnidreams_single_view_taehv on request)")  # fmt: skip
    parser.add_argument(
        "--blocks", type=int, default=8, help="AR blocks per run (medians over >= 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: a temp dir)"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 64x64")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each recipe's run, profile one steady block on the same inputs "
        "(scripts/profile_step.py: GPU time per kernel class, OUT/<recipe>_profile.json)",
    )
    parser.add_argument("overrides", nargs="*", help="extra flashdreams-bench overrides after --")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_omnidreams_"))
    out.mkdir(parents=True, exist_ok=True)
    size = (64, 64) if args.tiny else (1280, 704)
    frames = 1 + 4 * (2 * args.blocks - 1)  # 2 latent frames per block
    video, image = make_inputs(out, frames, *size)
    rows = []
    for recipe in args.recipe or DEFAULT:
        tiny = [*TINY, tiny_encoder(recipe)] if args.tiny else ["device=cuda"]
        extra = [*tiny, *args.overrides]
        rows.append(run(recipe, out, video, image, args.blocks, size, extra))
        if args.profile:
            profile(recipe, out, video, image, args.blocks, size, extra)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
