"""The demo's sampler (scaling_compiler.demo.sampling): its progress records."""
import logging

import pytest
import torch

from scaling_compiler.demo import sampling

LOGGER = "scaling_compiler.demo.sampling"


def zero_velocity(video, timestep, tokens):
    return torch.zeros_like(video)


def progress(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


@pytest.mark.parametrize("steps, logged", [(3, [1, 2, 3]), (8, list(range(1, 9))),
                                           (25, [3, 6, 9, 12, 15, 18, 21, 24, 25])])
def test_sampling_logs_its_progress_per_step(caplog, steps, logged):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    sampling.sample(zero_velocity, tokens, tokens, (1, 1, 2, 2), steps=steps, label="dense sampling")
    records = progress(caplog)
    timesteps = sampling.sampler_timesteps(steps)
    # every step up to 10 steps, else every ceil(n / 10)-th and the last: at most 11 lines
    assert [r.getMessage().split(" (t=")[0] for r in records] == [f"dense sampling: step {i}/{steps}"
                                                                   for i in logged]
    assert [r.getMessage().split("(t=")[1].split(")")[0] for r in records] == [f"{timesteps[i - 1]:.0f}"
                                                                                 for i in logged]
    seconds = [float(r.getMessage().split(" after ")[1].removesuffix(" s")) for r in records]
    assert seconds == sorted(seconds) and seconds[0] >= 0


def test_sampling_progress_is_silent_at_warning(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    sampling.sample(zero_velocity, tokens, tokens, (1, 1, 2, 2), steps=3)
    assert progress(caplog) == []


def test_demo_labels_its_two_sampling_runs(monkeypatch):
    """run_demo's two sampling runs log under their own labels (the CLI shows INFO records)."""
    from scaling_compiler.demo import run

    class Stop(Exception):
        pass

    labels = []

    def fake_sample(model, tokens, null, shape, label="sampling", **kwargs):
        labels.append(label)
        if len(labels) == 2:
            raise Stop  # the rest of the demo (timing, videos) is not under test
        return torch.zeros(1, *shape)

    monkeypatch.setattr(sampling, "sample", fake_sample)
    with pytest.raises(Stop):
        run.run_demo(steps=1, repeats=1)
    assert labels == ["scalingattn sampling (step 1 compiles)", "dense sampling"]
