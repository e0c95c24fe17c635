"""`flashdreams-serve` composes the same run config as `flashdreams-run`, plus its `serve` block."""

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from flashdreams.cli import group_options
from flashdreams.serve import config  # noqa: F401  (the serve schema)


@pytest.fixture(scope="module")
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        yield lambda name, overrides: OmegaConf.to_container(compose(name, overrides=overrides))
    GlobalHydra.instance().clear()


def test_every_recipe_serves_what_it_runs(composer):
    for recipe in group_options("recipe"):
        run = composer("run", [f"recipe={recipe}"])
        served = composer("serve", [f"recipe={recipe}"])
        assert served.pop("serve")["port"] == 8000
        run.pop("serve", None)
        assert served == run, recipe  # e.g. the recipe's 480x832, run_name, total_blocks


def test_serve_block_is_typed_and_the_recipe_size_survives(composer):
    served = composer("serve", ["recipe=self_forcing_wan21_t2v_1_3b_taehv", "serve.port=0"])
    assert (served["rollout"]["height"], served["rollout"]["width"]) == (480, 832)
    assert served["run_name"] == "self_forcing_wan21_t2v_1_3b_taehv"
    assert composer("serve", ["recipe=causal_wan22_a14b_480p"])["rollout"]["total_blocks"] == 6
    with pytest.raises(Exception, match="serve.prt"):
        composer("serve", ["serve.prt=1"])
    with pytest.raises(Exception, match="serve.port"):
        composer("serve", ["serve.port=abc"])


@pytest.mark.parametrize(("override", "message"), [
    ("serve.backend=grpc", "serve.backend=grpc must be local or ray"),
    ("serve.replicas=0", "serve.replicas=0 must be >= 1"),
    ("serve.ray_num_cpus=0", "serve.ray_num_cpus=0 must be >= 1 or null"),
    ("serve.max_frame_pixels=0", "serve.max_frame_pixels=0 must be in [1, 67108864]"),
    ("serve.max_frame_pixels=100000000",
     "serve.max_frame_pixels=100000000 must be in [1, 67108864]"),
    ("serve.max_messages_per_s=-1", "serve.max_messages_per_s=-1.0 must be >= 0"),
    ("serve.message_burst=0", "serve.message_burst=0 must be >= 1"),
])  # fmt: skip
def test_ray_settings_are_checked_in_one_line(composer, override, message):
    from flashdreams import ConfigError
    from flashdreams.serve.config import check_serve

    serve = OmegaConf.create(composer("serve", [override])["serve"])
    with pytest.raises(ConfigError) as err:
        check_serve(serve)
    assert str(err.value) == message
