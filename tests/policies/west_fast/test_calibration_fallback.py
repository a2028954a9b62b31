"""Calibration that fails, for any reason, falls back per graph: the graph's sites stay dense, the
report says why, one warning is logged, and torch.compile returns a model that equals eager."""
import logging

import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.policies.west_fast import calibrate as calibrate_module

from tests.local_dit import LocalDiT


def _model_and_inputs():
    torch.manual_seed(0)
    return LocalDiT((4, 8, 8)).eval(), torch.randn(1, 4, 4, 8, 8)


def _compile(caplog, **options):
    model, x = _model_and_inputs()
    backend = ScalingAttnBackend(density=0.5, compiler="eager", cache=False, calibration_samples=2, **options)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"), torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        expected = model(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("scaling_compiler")]
    return backend.report, out, expected, warnings


def _check_fallback(report, out, expected, warnings, cause):
    [site] = report.sites
    assert site.status == "dense"
    assert "calibration failed" in site.reason and cause in site.reason
    assert "calibration failed" in report.topology_origin
    assert report.masks == {}
    assert len(warnings) == 1 and "calibration failed" in warnings[0].getMessage()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_calibration_that_raises_falls_back_to_dense(caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected calibration failure")

    monkeypatch.setattr(calibrate_module._SiteCapture, "run", broken)
    _check_fallback(*_compile(caplog), cause="RuntimeError: injected calibration failure")


def test_calibration_inputs_that_do_not_fit_fall_back_to_dense(caplog):
    """The user's calibration inputs have the wrong shape: the model itself fails on them."""
    bad = [{"hidden_states": torch.randn(1, 3, 4, 8, 8)}]  # 3 channels, the model takes 4
    _check_fallback(*_compile(caplog, calibration_inputs=bad), cause="RuntimeError")


@pytest.mark.parametrize("error", [MemoryError("out of host memory"), ValueError("a bad value")])
def test_any_exception_type_falls_back(caplog, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(calibrate_module, "calibration_inputs", broken)
    _check_fallback(*_compile(caplog), cause=type(error).__name__)
