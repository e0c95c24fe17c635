"""The Wan 2.1 / 2.2 streaming VAE decoders run under the run's graph policy (CPU, tiny VAEs):

* the steady decoder calls (from a clip's third call on: every causal-conv cache entry then
  holds two frames) go through the policy's ``wrap`` once and ``run`` with the chunk's shape as
  key, the cache fed back as an input; the first two calls run eager;
* the policy-run decode equals the eager streaming decode and a whole-clip decode, block after
  block and across a ``reset`` (eager wrap path, and a real ``torch.compile`` with the
  ``aot_eager`` backend, full graph);
* ``vae.graph=eager`` ignores the policy; a bad ``vae.graph`` is a one-line error;
* the build hands the decoder its own policy instance (not the DiT's, not the control's).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flashdreams import ConfigError
from flashdreams.graph.compile import CompilePolicy, compile_static
from flashdreams.graph.cuda_graph import CudaGraphPolicy, _flatten
from flashdreams.graph.eager import EagerPolicy
from flashdreams.vae.base import FedDecoder
from flashdreams.vae.color_fix import ColorFixedDecoder
from flashdreams.vae.wan21 import Wan21StreamingDecoder
from flashdreams.vae.wan22 import Wan22StreamingDecoder

SMALL = dict(base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True])
DECODERS = {"wan21": (Wan21StreamingDecoder, 16), "wan22": (Wan22StreamingDecoder, 48)}
VAE_OVERRIDES = [
    "vae.base_dim=8",
    "vae.dim_mult=[1,2,2]",
    "vae.num_res_blocks=1",
    "vae.temperal_downsample=[true,true]",
]  # SMALL, as overrides
BLOCKS = [3, 2, 2, 2]  # the first block (frame 0 alone, then 2 frames), then steady blocks


class Recording(EagerPolicy):
    """Eager, recording what the decoder asked of it and checking what capture relies on: one
    key always sees the same argument shapes, and every cache entry is a two-frame tensor (or
    ``None`` for a conv that keeps none, the 1x1 shortcuts), never the first call's ``"Rep"``."""

    def __init__(self) -> None:
        self.wrapped, self.keys, self.shapes = [], [], {}

    def wrap(self, fn):
        self.wrapped.append(fn)
        return fn

    def run(self, fn, *args, shape_key):
        latents, cache = args
        assert all(c.shape[2] == 2 if isinstance(c, torch.Tensor) else c is None for c in cache)
        shapes = [tuple(t.shape) for t in _flatten(args)]
        assert self.shapes.setdefault(shape_key, shapes) == shapes
        self.keys.append(shape_key)
        return fn(*args)


class AotEager(CompilePolicy):
    """A real ``torch.compile`` (full graph, static shapes) with the fast ``aot_eager`` backend."""

    def wrap(self, fn):
        return compile_static(fn, backend="aot_eager")


def _decoder(kind: str, **kw):
    cls, z = DECODERS[kind]
    return cls(z_dim=z, **SMALL, **kw).eval(), z


def _latents(z: int) -> torch.Tensor:
    return torch.randn(1, z, sum(BLOCKS), 2, 3, generator=torch.Generator().manual_seed(1))


def _stream(decoder, latents, blocks=BLOCKS) -> torch.Tensor:
    decoder.reset()
    outs = [decoder.decode_step(b) for b in latents.split(blocks, dim=2)]
    assert [o.shape[1] for o in outs] == [1 + 4 * (blocks[0] - 1)] + [4 * n for n in blocks[1:]]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk_frames", [0, 1])
@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_steady_calls_run_under_the_policy_and_equal_eager(kind, chunk_frames):
    decoder, z = _decoder(kind, chunk_frames=chunk_frames)
    latents = _latents(z)
    eager = _stream(decoder, latents)
    whole = _stream(decoder, latents, [sum(BLOCKS)])  # the whole clip in one call
    torch.testing.assert_close(eager, whole, rtol=0, atol=1e-5)
    policy = Recording()
    decoder.set_graph(policy)
    for _ in range(2):  # a second clip after reset starts afresh, same keys
        graphed = _stream(decoder, latents)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert len(policy.wrapped) == 1  # compiled once, every steady call reuses it
    if chunk_frames == 0:  # calls: frame 0, frames 1-2 (eager), then one per steady block
        steady = [("wan_vae_decode", (1, z, 2, 2, 3))] * (len(BLOCKS) - 1)
    else:  # one call per latent frame: the first two eager
        steady = [("wan_vae_decode", (1, z, 1, 2, 3))] * (sum(BLOCKS) - 2)
    assert policy.keys == steady * 2


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_compiled_decode_equals_eager(kind):
    decoder, z = _decoder(kind)
    latents = _latents(z)
    eager = _stream(decoder, latents)
    decoder.set_graph(AotEager())
    torch._dynamo.reset()
    counters.clear()
    compiled = _stream(decoder, latents)
    assert counters["stats"]["unique_graphs"] == 1  # one steady shape, one full graph
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_wrappers_pass_the_policy_to_the_decoder():
    decoder, _ = _decoder("wan21")
    policy = Recording()
    FedDecoder(ColorFixedDecoder(decoder), lambda start, num: {}).set_graph(policy)
    assert decoder._graph is policy


def test_graph_eager_ignores_the_policy_and_bad_values_fail():
    decoder, z = _decoder("wan21", graph="eager")
    policy = Recording()
    decoder.set_graph(policy)
    _stream(decoder, _latents(z))
    assert policy.keys == [] and policy.wrapped == []
    with pytest.raises(ConfigError, match=r"^vae.graph='capture' must be one of follow, eager$"):
        _decoder("wan22", graph="capture")


def test_build_gives_the_decoder_its_own_graph_policy():
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    cfg = compose_run(["recipe=hy_worldplay_wan_i2v_5b", "model.checkpoint=null",
                       "text_encoder=random", "vae.checkpoint=null",
                       "conditioner.encoder.checkpoint=null", "rollout.total_blocks=2",
                       "pose=w-7", "model.dim=64", "model.num_heads=2", "model.num_layers=2",
                       "model.ffn_dim=128", "model.text_dim=32", "model.text_len=8",
                       "model.memory_points=2000", *VAE_OVERRIDES,
                       "rollout.height=32", "rollout.width=32", "device=cpu", "dtype=float32",
                       "graph=compile_cuda_graph", "attention=sdpa", "vae.graph=follow"])  # fmt: skip
    rollout = build_rollout(cfg)
    policy = rollout.vae._graph
    assert isinstance(rollout.vae, Wan22StreamingDecoder)
    assert isinstance(policy, CudaGraphPolicy) and policy.compiles
    assert policy is not rollout.graph and policy is not rollout.control._graph


class RecordingCapture(Recording):
    """A ``Recording`` that says it captures: what ``warm_up`` asks of a capturing policy."""

    captures = True


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_warm_up_makes_the_steady_call_before_the_clip_and_leaves_no_state(kind):
    """``warm_up`` (``Rollout.precapture``) runs the steady call once on stand-in latents, so a
    capturing policy captures it before the first step; the clip then decodes exactly as
    without it, and a later session start (same plan) decodes nothing more."""
    decoder, z = _decoder(kind)
    latents = _latents(z)
    eager = _stream(decoder, latents)
    policy = RecordingCapture()
    decoder.set_graph(policy)
    decoder.warm_up(BLOCKS[:3], 1, (2, 3), torch.device("cpu"), torch.float32)
    assert policy.keys == [("wan_vae_decode", (1, z, 2, 2, 3))]  # the steady block, once
    assert decoder._feat_cache is None  # reset: the next decode_step starts a clip
    torch.testing.assert_close(_stream(decoder, latents), eager, rtol=0, atol=0)
    keys = len(policy.keys)
    decoder.warm_up(BLOCKS[:3], 1, (2, 3), torch.device("cpu"), torch.float32)
    assert len(policy.keys) == keys  # warmed already


def test_warm_up_does_nothing_without_a_policy_that_compiles_or_captures():
    decoder, _ = _decoder("wan21")
    policy = Recording()  # eager: nothing to make ahead
    decoder.set_graph(policy)
    decoder.warm_up(BLOCKS[:3], 1, (2, 3), torch.device("cpu"), torch.float32)
    eager_mode, _ = _decoder("wan21", graph="eager")
    capturing = RecordingCapture()
    eager_mode.set_graph(capturing)  # vae.graph=eager: ignored
    eager_mode.warm_up(BLOCKS[:3], 1, (2, 3), torch.device("cpu"), torch.float32)
    assert policy.keys == [] and capturing.keys == []


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_traceable_resample_decodes_as_diffusers_resample(kind):
    """The decoders' temporal upsamplers are ``TraceableResample`` (no ``tensor == "Rep"`` in
    the steady call, which torch 2.11's dynamo refuses); a stream equals diffusers' module."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from flashdreams.vae.wan21 import TraceableResample

    ours, z = _decoder(kind)
    resamples = [m for m in ours.modules() if isinstance(m, WanResample)]
    assert resamples and all(type(m) is TraceableResample for m in resamples)
    theirs, _ = _decoder(kind)
    for m in theirs.modules():
        if isinstance(m, WanResample):
            m.__class__ = WanResample
    latents = _latents(z)
    torch.testing.assert_close(_stream(ours, latents), _stream(theirs, latents), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_channels_last_decodes_the_same_frames(kind):
    """``vae.channels_last=true`` (NDHWC convolutions) changes the layout, not the values; the
    frames come back in the default layout."""
    plain, z = _decoder(kind)
    fast, _ = _decoder(kind, channels_last=True)
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    latents = _latents(z)
    out = _stream(fast, latents)
    assert out.is_contiguous()
    torch.testing.assert_close(out, _stream(plain, latents), rtol=0, atol=1e-5)


def test_channels_last_encoder_encodes_the_same_latents():
    from flashdreams.vae.wan21_encode import Wan21Encoder

    video = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain, fast = (Wan21Encoder(**SMALL, channels_last=c) for c in (False, True))
    out = fast.encode(video)
    assert out.is_contiguous()
    torch.testing.assert_close(out, plain.encode(video), rtol=0, atol=1e-5)
    cache = [None] * fast._num_convs
    first, cache = fast.encode_step(video[:, :, :1], cache)
    rest, _ = fast.encode_step(video[:, :, 1:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), out, rtol=0, atol=1e-5)
