"""Matrix-Game 2.0: release checkpoints load into MatrixGameDiT; the keyboard/mouse control
cuts the release's action windows from files and live control, and validates them."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashdreams import ConfigError
from flashdreams.control.keyboard_mouse import CAM, KeyboardMouseControl
from flashdreams.io.checkpoint import CheckpointError, materialize
from flashdreams.model.matrix_game import MatrixGameDiT

SMALL = dict(dim=32, num_heads=2, num_layers=2, ffn_dim=48, image_dim=16, action_blocks=1,
             action_heads=2, action_embed_dim=8, keyboard_hidden_dim=16, mouse_hidden_dim=16,
             action_rope_dims=(2, 3, 3))  # fmt: skip


def release_keys(dim, ffn, layers, image_dim, action_blocks, kdim, mouse, emb, kh, mh, heads):
    """Key -> shape of the release's ``CausalWanModel`` (i2v, no text embedding), written from
    Matrix-Game-2 ``wan/modules/causal_model.py`` / ``action_module.py``."""
    keys = {"patch_embedding.weight": (dim, 36, 1, 2, 2), "patch_embedding.bias": (dim,),
            "time_embedding.0.weight": (dim, 256), "time_embedding.0.bias": (dim,),
            "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
            "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
            "head.head.weight": (64, dim), "head.head.bias": (64,), "head.modulation": (1, 2, dim),
            "img_emb.proj.0.weight": (image_dim,), "img_emb.proj.0.bias": (image_dim,),
            "img_emb.proj.1.weight": (image_dim, image_dim), "img_emb.proj.1.bias": (image_dim,),
            "img_emb.proj.3.weight": (dim, image_dim), "img_emb.proj.3.bias": (dim,),
            "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,)}  # fmt: skip
    for n in range(layers):
        p = f"blocks.{n}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                keys[f"{p}{attn}.{proj}.weight"] = (dim, dim)
                keys[f"{p}{attn}.{proj}.bias"] = (dim,)
            keys[f"{p}{attn}.norm_q.weight"] = keys[f"{p}{attn}.norm_k.weight"] = (dim,)
        keys.update({f"{p}norm3.weight": (dim,), f"{p}norm3.bias": (dim,),
                     f"{p}ffn.0.weight": (ffn, dim), f"{p}ffn.0.bias": (ffn,),
                     f"{p}ffn.2.weight": (dim, ffn), f"{p}ffn.2.bias": (dim,),
                     f"{p}modulation": (1, 6, dim)})  # fmt: skip
        if n >= action_blocks:
            continue
        a = f"{p}action_model."
        keys.update({f"{a}keyboard_embed.0.weight": (emb, kdim), f"{a}keyboard_embed.0.bias": (emb,),
                     f"{a}keyboard_embed.2.weight": (emb, emb), f"{a}keyboard_embed.2.bias": (emb,),
                     f"{a}key_attn_q_norm.weight": (kh // heads,),
                     f"{a}key_attn_k_norm.weight": (kh // heads,),
                     f"{a}mouse_attn_q.weight": (kh, dim),
                     f"{a}keyboard_attn_kv.weight": (2 * kh, emb * 12),
                     f"{a}proj_keyboard.weight": (dim, kh)})  # fmt: skip
        if mouse:
            keys.update({f"{a}mouse_mlp.0.weight": (mh, 2 * 12 + dim), f"{a}mouse_mlp.0.bias": (mh,),
                         f"{a}mouse_mlp.2.weight": (mh, mh), f"{a}mouse_mlp.2.bias": (mh,),
                         f"{a}mouse_mlp.3.weight": (mh,), f"{a}mouse_mlp.3.bias": (mh,),
                         f"{a}t_qkv.weight": (3 * mh, mh),
                         f"{a}img_attn_q_norm.weight": (mh // heads,),
                         f"{a}img_attn_k_norm.weight": (mh // heads,),
                         f"{a}proj_mouse.weight": (dim, mh)})  # fmt: skip
    return keys


def _write_release(path, kdim, mouse):
    shapes = release_keys(32, 48, 2, 16, 1, kdim, mouse, 8, 16, 16, 2)
    g = torch.Generator().manual_seed(1)
    # the release's WanDiffusionWrapper holds the DiT as `model`: keys start with "model."
    state = {f"model.{k}": torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("kdim,mouse", [(4, True), (7, False)])
def test_release_checkpoint_loads(tmp_path, kdim, mouse):
    path = tmp_path / "base_distill.safetensors"
    state = _write_release(path, kdim, mouse)
    with torch.device("meta"):
        model = MatrixGameDiT(**SMALL, keyboard_dim=kdim, mouse_dim=2 if mouse else 0)
    materialize(model, str(path), "cpu", torch.float32)
    got = model.blocks[0].action_model.keyboard_attn_kv.weight
    torch.testing.assert_close(got, state["model.blocks.0.action_model.keyboard_attn_kv.weight"])
    torch.testing.assert_close(model.img_emb.proj[3].weight, state["model.img_emb.proj.3.weight"])
    ctx = model.prepare_context(None, torch.randn(1, 257, 16))
    inputs = {"image_latents": torch.randn(1, 20, 3, 4, 4), "keyboard": torch.zeros(1, 3, 12, kdim)}
    if mouse:
        inputs["mouse"] = torch.zeros(1, 3, 12, 2)
    out = model(torch.randn(1, 16, 3, 4, 4), torch.full((1,), 500.0), ctx, inputs=inputs)
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()


def test_checkpoint_of_another_variant_fails_naming_the_action_weights(tmp_path):
    path = tmp_path / "gta_keyboard2dim.safetensors"
    _write_release(path, 2, True)  # a GTA-drive checkpoint into the universal model
    with torch.device("meta"):
        model = MatrixGameDiT(**SMALL, keyboard_dim=4)
    with pytest.raises(CheckpointError, match="keyboard_embed.0.weight: checkpoint"):
        materialize(model, str(path), "cpu", torch.float32)


def _release_windows(per_frame: torch.Tensor, latent: range) -> torch.Tensor:
    """The release's windows: pad 12 copies of frame 0 in front, latent frame i reads padded
    rows [4 (i - 3) + 12, 4 i + 12) (``ActionModule.forward``)."""
    padded = torch.cat([per_frame[:1].expand(12, -1), per_frame])
    return torch.stack([padded[4 * (i - 3) + 12 : 4 * i + 12] for i in latent])


def _prepare(enc, frames):
    enc.prepare(1, height=32, width=32, num_frames=frames, device=torch.device("cpu"))
    return enc


def test_file_windows_match_the_release(tmp_path):
    g = torch.Generator().manual_seed(0)
    kb = torch.randint(0, 2, (1 + 4 * 8, 4), generator=g).float()
    # camera deltas within the release's range (+-0.1 per step, under control.mouse_max_steps=2)
    ms = (torch.rand(1 + 4 * 8, 2, generator=g) * 2 - 1) * 0.15
    path = tmp_path / "actions.pt"
    torch.save({"keyboard_condition": kb[None], "mouse_condition": ms[None]}, path)
    enc = _prepare(KeyboardMouseControl("universal", actions=str(path)), 9)
    for start in (0, 3, 6):
        got, frames = enc.inputs(start, 3), range(start, start + 3)
        torch.testing.assert_close(got["keyboard"][0], _release_windows(kb, frames))
        torch.testing.assert_close(got["mouse"][0], _release_windows(ms, frames))
    npy = tmp_path / "actions.npy"
    np.save(npy, torch.cat([kb, ms], 1).numpy())
    again = _prepare(KeyboardMouseControl("universal", actions=str(npy)), 9).inputs(3, 3)
    torch.testing.assert_close(again["mouse"], enc.inputs(3, 3)["mouse"])


def test_live_control_equals_the_file_with_the_same_actions(tmp_path):
    """Per step a held key set + pointer movement; the JSON file holds the same actions on the
    video frames of each block (9 for block 0, then 12): identical model inputs."""
    steps = [{"keys": ["w"], "mouse": [0.0, 0.0]}, {"keys": ["w", "a"], "mouse": [0.05, 0.0]},
             {"keys": ["s"], "mouse": [0.0, -0.1]}]  # fmt: skip
    frames = [9, 12, 12]
    path = tmp_path / "actions.json"
    entries = [{**c, "frames": n} for c, n in zip(steps, frames, strict=True)]
    path.write_text(json.dumps({"actions": entries}))
    from_file = _prepare(KeyboardMouseControl("universal", actions=str(path)), 9)
    live = _prepare(KeyboardMouseControl("universal"), 9)
    for i, control in enumerate(steps):
        live.set_control(control)
        a, b = live.inputs(3 * i, 3), from_file.inputs(3 * i, 3)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # pointer right = yaw +, pointer down = pitch - (the release's [pitch, yaw] per frame)
    assert live.inputs(6, 3)["mouse"][0, -1, -1].tolist() == pytest.approx([0.1, 0.0])
    assert live.inputs(3, 3)["mouse"][0, -1, -1].tolist() == pytest.approx([0.0, 0.05])
    assert live.state() == {"keys": ["s"], "mouse": [0.0, -0.1]}


def test_a_replay_of_committed_blocks_keeps_their_actions():
    """A recache replays committed blocks after the step's control was set: the replay reads
    the actions those blocks had; the control goes to the new block."""
    enc = _prepare(KeyboardMouseControl("universal"), 9)
    enc.set_control({"keys": ["w"]})
    first = enc.inputs(0, 3)["keyboard"].clone()
    enc.set_control({"keys": ["s"]})
    torch.testing.assert_close(enc.inputs(0, 3)["keyboard"], first)  # the replay
    new = enc.inputs(3, 3)["keyboard"][0, -1, -1]
    assert new.tolist() == [0, 1, 0, 0] and first[0, -1, -1].tolist() == [1, 0, 0, 0]


def test_templerun_is_one_hot_with_nomove_when_idle():
    enc = _prepare(KeyboardMouseControl("templerun"), 3)
    assert set(enc.provides()) == {"keyboard"}
    idle = enc.inputs(0, 3)["keyboard"]
    assert idle.shape == (1, 3, 12, 7) and (idle[..., 0] == 1).all() and idle[..., 1:].sum() == 0
    enc.set_control({"keys": [" "]})  # the browser's name of the space bar
    jump = enc.inputs(3, 3)["keyboard"][0, -1, -1]
    assert jump.tolist() == [0, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match=r"'q' is not an action of the templerun variant"):
        enc.validate({"keys": ["q"]})


@pytest.mark.parametrize("variant,control,match", [
    ("templerun", {"mouse": [1.0, 0.0]}, r"control.mouse: the templerun variant has no mouse"),
    ("templerun", {"keys": ["w", "s"]}, r"one key at a time"),
    ("gta_drive", {"keys": ["q"]}, r"control.keys: 'q' is not an action of the gta_drive"),
    ("universal", {"keys": ["w"], "look": 1}, r"unknown field 'look'"),
    ("universal", {"mouse": [1.0]}, r"control.mouse must be \[dx, dy\]"),
])  # fmt: skip
def test_bad_live_control_is_a_one_line_error(variant, control, match):
    enc = KeyboardMouseControl(variant)
    with pytest.raises(ConfigError, match=match) as err:
        enc.set_control(control)
    assert "\n" not in str(err.value)


def test_bad_action_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((20, 5), np.float32))
    with pytest.raises(ConfigError, match=r"control.actions=.*expected \[frames, 6\]"):
        KeyboardMouseControl("universal", actions=str(bad))
    js = tmp_path / "bad.json"
    js.write_text(json.dumps([{"keys": ["x"], "frames": 4}]))
    with pytest.raises(ConfigError, match=r"actions\[0\].keys: 'x' is not an action"):
        KeyboardMouseControl("universal", actions=str(js))
    pt = tmp_path / "templerun.pt"
    torch.save({"keyboard_condition": torch.zeros(9, 7), "mouse_condition": torch.zeros(9, 2)}, pt)
    with pytest.raises(ConfigError, match=r"'mouse_condition', but the templerun variant"):
        KeyboardMouseControl("templerun", actions=str(pt))
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"keys": ["w"], "frames": 9}]))
    enc = KeyboardMouseControl("universal", actions=str(short))
    enc.check_frames(3)  # 9 video frames: 3 latent frames
    with pytest.raises(ConfigError, match=r"has 9 video frames of actions, the run needs 13"):
        enc.check_frames(4)
    with pytest.raises(ConfigError, match=r"control.variant='minecraft'"):
        KeyboardMouseControl("minecraft")


def test_model_rejects_windows_of_another_variant():
    model = MatrixGameDiT(**SMALL, keyboard_dim=4).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    ctx = model.prepare_context(None, torch.randn(1, 257, 16))
    inputs = {"image_latents": torch.randn(1, 20, 3, 4, 4), "keyboard": torch.zeros(1, 3, 12, 7)}
    with pytest.raises(ConfigError, match=r"input 'keyboard' has shape \(1, 3, 12, 7\)"):
        model(torch.randn(1, 16, 3, 4, 4), torch.full((1,), 500.0), ctx, inputs=inputs)


def test_live_control_lists_what_the_page_may_send():
    """The server's hello carries these; the page sends only the keys (and mouse) listed, so
    a key another recipe uses (shift, q) never fails a Matrix-Game step."""
    from flashdreams.control.camera import CameraControl
    from flashdreams.control.keyboard_mouse import KeyboardMouseControl

    for variant in ("universal", "gta_drive", "templerun"):
        control = KeyboardMouseControl(variant=variant)
        live = control.live_control()
        control.validate(
            {"keys": live["keys"][:1], **({"mouse": [1.0, 0.0]} if live["mouse"] else {})}
        )
        assert "shift" not in live["keys"] and "q" not in live["keys"]
    assert KeyboardMouseControl(variant="templerun").live_control()["mouse"] is False
    assert CameraControl().live_control() == {"keys": list("adeikqsw"), "mouse": False}


def _camera(enc, control):
    """The [pitch, yaw] one video frame of ``control`` feeds the model."""
    return enc.parse(control)[enc.keymap.keyboard_dim :].tolist()


def test_mouse_is_in_camera_units_and_the_page_converts_pixels():
    """The protocol's mouse is the release's camera units (0.1 = one camera step, a camera
    key's); the hello tells the page how many units a pointer pixel is: 20 px per video frame
    (the default) turn exactly as the camera key does."""
    enc = KeyboardMouseControl("universal")
    live = enc.live_control()
    assert live["mouse_per_px"] == pytest.approx(CAM / 20)
    assert live["mouse_max"] == pytest.approx(2 * CAM)
    page = [20 * live["mouse_per_px"], 0.0]  # what the page sends for 20 px right per frame
    assert _camera(enc, {"mouse": page}) == pytest.approx(_camera(enc, {"keys": ["l"]}))
    assert _camera(enc, {"mouse": [0.0, 0.05]}) == pytest.approx([-0.05, 0.0])  # down: pitch -
    slow = KeyboardMouseControl("gta_drive", mouse_pixels_per_step=40.0).live_control()
    assert slow["mouse_per_px"] == pytest.approx(CAM / 40)
    assert "mouse_per_px" not in KeyboardMouseControl("templerun").live_control()  # no mouse
    # a normal hand movement (~20 px per frame) sent as raw pixels is clamped, not 200x the step
    assert _camera(enc, {"mouse": [20.0, 0.0]}) == pytest.approx([0.0, 2 * CAM])


@pytest.mark.parametrize("mouse,camera", [
    ([5.0, -7.0], [0.2, 0.2]),  # per axis, pitch = -dy
    ([1e300, -1e300], [0.2, 0.2]),
    ([10**300, 0], [0.0, 0.2]),  # a big int that still fits a float
    ([-0.15, 0.0], [0.0, -0.15]),  # within the bound: as sent
])  # fmt: skip
def test_a_frames_camera_delta_is_clamped(mouse, camera):
    enc = KeyboardMouseControl("universal")
    assert _camera(enc, {"mouse": mouse}) == pytest.approx(camera)
    # keys + mouse together stay within the bound as well
    assert _camera(enc, {"keys": ["l", "arrowright"], "mouse": [0.2, 0.0]})[1] == pytest.approx(0.2)
    tight = KeyboardMouseControl("universal", mouse_max_steps=1.0)
    assert _camera(tight, {"mouse": [1.0, 0.0]}) == pytest.approx([0.0, CAM])


@pytest.mark.parametrize("mouse", [[float("nan"), 0.0], [0.0, float("inf")], [10**400, 0]])
def test_a_non_finite_mouse_is_a_one_line_error(mouse):
    enc = KeyboardMouseControl("gta_drive")
    with pytest.raises(ConfigError, match=r"control.mouse must be finite numbers") as err:
        enc.validate({"keys": ["w"], "mouse": mouse})
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_files_share_the_units_and_the_bound(tmp_path):
    """A JSON file's mouse is the live control's (clamped the same way); the release's tensors
    and .npy feed the model as they are, so a value beyond the bound is a one-line error."""
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"keys": ["w"], "mouse": [50.0, -0.05], "frames": 9}]))
    enc = _prepare(KeyboardMouseControl("universal", actions=str(js)), 3)
    live = _prepare(KeyboardMouseControl("universal"), 3)
    live.set_control({"keys": ["w"], "mouse": [50.0, -0.05]})
    torch.testing.assert_close(enc.inputs(0, 3)["mouse"], live.inputs(0, 3)["mouse"])
    assert enc.inputs(0, 3)["mouse"][0, -1, -1].tolist() == pytest.approx([0.05, 0.2])
    npy = tmp_path / "big.npy"
    rows = np.zeros((9, 6), np.float32)
    rows[:, 5] = CAM  # the release's own step: fine
    rows[4, 4] = 0.5
    np.save(npy, rows)
    with pytest.raises(ConfigError, match=r"video frame 4 moves the camera by 0.5 .*"
                       r"control.mouse_max_steps") as err:  # fmt: skip
        KeyboardMouseControl("universal", actions=str(npy))
    assert "\n" not in str(err.value)
    loaded = KeyboardMouseControl("universal", actions=str(npy), mouse_max_steps=5.0)
    assert loaded.file[4, 4] == pytest.approx(0.5)  # raised bound: the file as it is
    pt = tmp_path / "release.pt"
    steer = torch.full((9, 2), -CAM)
    torch.save({"keyboard_condition": torch.zeros(9, 2), "mouse_condition": steer}, pt)
    release = KeyboardMouseControl("gta_drive", actions=str(pt))
    assert release.file[:, 2:].min() == pytest.approx(-CAM)


@pytest.mark.parametrize("kwargs,match", [
    ({"mouse_pixels_per_step": 0.0}, r"control.mouse_pixels_per_step=0.0 must be a positive"),
    ({"mouse_max_steps": 0.5}, r"control.mouse_max_steps=0.5 must be a number >= 1"),
    ({"mouse_max_steps": float("inf")}, r"control.mouse_max_steps=inf"),
])  # fmt: skip
def test_bad_mouse_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KeyboardMouseControl("universal", **kwargs)


def test_action_windows_reach_the_device_without_a_blocking_copy(monkeypatch):
    """A blocking host-to-device copy waits for the GPU's queue: one per denoising step would
    stall the step. The windows are copied asynchronously."""
    calls = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    enc = KeyboardMouseControl("universal")
    enc.prepare(1, height=32, width=32, num_frames=6, device="cpu")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = enc.inputs(3, 3)
    assert out["keyboard"].shape == (1, 3, 12, 4) and out["mouse"].shape == (1, 3, 12, 2)
    assert calls and all(calls)
