"""flashdreams.Session under careless use: threads, use after close, bad prompts, seeds, lengths."""

import subprocess
import sys
import threading

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.session import Session, SessionClosed
from tests.unit.test_config import compose_run

TINY = ["device=cpu", "rollout.height=32", "rollout.width=32", "cache.window_frames=6"]


@pytest.fixture(scope="module")
def cfg():
    return compose_run(TINY)


def test_two_threads_stepping_one_session_match_a_sequential_run(cfg):
    reference = Session(cfg, prompt="a fox", seed=5)
    expected = [reference.step() for _ in range(6)]
    session = Session(cfg, prompt="a fox", seed=5)
    got: list[torch.Tensor] = []
    barrier = threading.Barrier(2)

    def worker():
        barrier.wait()
        for _ in range(3):
            got.append(session.step())

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.step_index == 6 and len(got) == 6
    # each step ran whole: every output is one of the sequential run's, each used once
    unused = list(range(6))
    for frames in got:
        match = [i for i in unused if torch.equal(frames, expected[i])]
        assert match, "an output of the threaded run matches no step of the sequential run"
        unused.remove(match[0])


def test_after_close_every_call_raises_and_finished_tells_the_truth(cfg):
    session = Session(cfg, prompt="a fox")
    session.step()
    assert not session.closed and not session.finished
    session.close()
    assert session.closed and session.finished
    for call in (session.step, session.reset, lambda: session.set_prompt("a cat")):
        with pytest.raises(SessionClosed, match="closed"):
            call()
    session.close()  # twice is fine
    assert list(session) == []


@pytest.mark.parametrize("prompt", [123, None, {"a": 1}, ["a", 1], [], ["a", "b"], "  "])
def test_set_prompt_takes_a_string_or_a_list_of_strings(cfg, prompt):
    session = Session(cfg, prompt="a fox")
    with pytest.raises(ValueError, match="prompt must"):
        session.set_prompt(prompt)
    session.set_prompt(["a cat"])  # a list of batch_size strings is fine
    assert session.prompts == ["a cat"]


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, True, "3"])
def test_seed_out_of_range_is_a_config_error(cfg, seed):
    session = Session(cfg, prompt="a fox")
    with pytest.raises(ConfigError, match=r"seed=.* must be an integer in \[0, 2\*\*63\)"):
        session.reset(seed=seed)
    with pytest.raises(ConfigError, match="seed="):
        Session(cfg, seed=seed)
    session.reset(seed=2**63 - 1)  # the largest seed runs
    assert torch.isfinite(session.step()).all()


@pytest.mark.parametrize("total", [0, -1, 1.5, True, "2"])
def test_total_blocks_must_be_a_positive_integer_or_none(cfg, total):
    with pytest.raises(ConfigError, match="total_blocks=.* must be a positive integer or null"):
        Session(cfg, total_blocks=total)


def test_session_of_a_hydra_composed_config_without_importing_the_schema():
    """The README's path: compose with Hydra first, then ``Session(cfg)``; no schema import."""
    code = (
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('flashdreams.conf', version_base='1.3'):\n"
        f"    cfg = compose('run', overrides={TINY!r})\n"
        "from flashdreams import Session\n"
        "assert Session(cfg, total_blocks=1).step().shape[-1] == 32\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
