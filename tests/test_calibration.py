"""The calibration fit recovers known coefficients from a synthetic engine (no timing)."""

import dataclasses

import numpy as np
import pytest

from warmserve.calibration.fit import StepSample, fit_bandwidth, fit_step_model, predict
from warmserve.hardware import GpuSpec
from warmserve.model_spec import spec_from_hf_config
from warmserve.sim.latency import LatencyParams

DEVICE = GpuSpec("test-cpu", peak_flops=2e11, hbm_bandwidth=2e10, memory_bytes=2 << 30,
                 host_to_device_bandwidth=5e9, nvlink_bandwidth=2e10)  # fmt: skip
TRUE = LatencyParams(flops_efficiency=0.35, bandwidth_efficiency=0.6, step_overhead_s=0.004,
                     layer_overhead_s=0.0003, seq_overhead_s=0.002)  # fmt: skip


def llama(name: str, layers: int, hidden: int) -> object:
    return spec_from_hf_config(name, {
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_attention_heads": 8,
        "num_hidden_layers": layers, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 2048, "torch_dtype": "float32",
        "tie_word_embeddings": True})  # fmt: skip


SPECS = {"small": llama("small", 30, 576), "wide": llama("wide", 2, 1536)}


def grid(specs=SPECS) -> list[StepSample]:
    """The calibrate grid's shape: prefills of 1-8 prompts, decodes of 1-32 sequences."""
    out = []
    for name in specs:
        for b in (1, 2, 4, 8):
            for n in (16, 64, 256):
                out.append(StepSample(name, "prefill", b, b * n, float(b * n * n), 0.0))
        for b in (1, 4, 16, 32):
            for c in (64, 512):
                out.append(StepSample(name, "decode", b, b, float(b * c), 0.0))
    return out


def synthetic(samples, params=TRUE, noise=0.0, seed=0, specs=SPECS):
    """A synthetic engine whose step times are exactly the model's (times optional noise)."""
    rng = np.random.default_rng(seed)
    return [
        dataclasses.replace(
            s, seconds=predict(s, specs[s.model], DEVICE, params) * (1 + noise * rng.normal())
        )
        for s in samples
    ]


def test_fit_recovers_known_coefficients_exactly():
    samples = synthetic(grid())
    # The synthetic engine is really in both regimes (else the test could not fail on B or F).
    kinds = {s.kind for s in samples}
    assert kinds == {"prefill", "decode"}
    fit = fit_step_model(samples, SPECS, DEVICE)
    p = fit.latency
    assert p.flops_efficiency == pytest.approx(TRUE.flops_efficiency, rel=1e-6)
    assert p.bandwidth_efficiency == pytest.approx(TRUE.bandwidth_efficiency, rel=1e-6)
    assert p.step_overhead_s == pytest.approx(TRUE.step_overhead_s, rel=1e-6)
    assert p.layer_overhead_s == pytest.approx(TRUE.layer_overhead_s, rel=1e-6)
    assert p.seq_overhead_s == pytest.approx(TRUE.seq_overhead_s, rel=1e-6)
    assert fit.layer_term and fit.max_abs_rel_error < 1e-6


def test_fit_with_noise_stays_close():
    fit = fit_step_model(synthetic(grid(), noise=0.03, seed=3), SPECS, DEVICE)
    p = fit.latency
    assert p.flops_efficiency == pytest.approx(TRUE.flops_efficiency, rel=0.1)
    assert p.bandwidth_efficiency == pytest.approx(TRUE.bandwidth_efficiency, rel=0.1)
    fixed = p.step_overhead_s + 30 * p.layer_overhead_s
    assert fixed == pytest.approx(TRUE.step_overhead_s + 30 * TRUE.layer_overhead_s, rel=0.1)
    assert p.seq_overhead_s == pytest.approx(TRUE.seq_overhead_s, rel=0.2)
    assert 0.01 < fit.mean_abs_rel_error < 0.06  # the noise shows up as fit error


def test_one_model_merges_the_overheads():
    one = {"small": SPECS["small"]}
    fit = fit_step_model(synthetic(grid(one), specs=one), one, DEVICE)
    assert not fit.layer_term and fit.latency.layer_overhead_s == 0.0
    fixed = TRUE.step_overhead_s + 30 * TRUE.layer_overhead_s
    assert fit.latency.step_overhead_s == pytest.approx(fixed, rel=1e-6)
    assert fit.latency.seq_overhead_s == pytest.approx(TRUE.seq_overhead_s, rel=1e-6)
    assert fit.max_abs_rel_error < 1e-6


def test_fit_rejects_too_few_or_bad_samples():
    with pytest.raises(ValueError, match="at least 4"):
        fit_step_model(synthetic(grid())[:3], SPECS, DEVICE)
    bad = [dataclasses.replace(s, seconds=0.0) for s in grid()]
    with pytest.raises(ValueError, match="> 0"):
        fit_step_model(bad, SPECS, DEVICE)


def test_overheads_are_never_negative():
    # A synthetic engine with no fixed cost at all: the fit must not go below zero to chase
    # the noise, and it still finds the bandwidth and FLOP/s.
    zero = LatencyParams(flops_efficiency=0.35, bandwidth_efficiency=0.6, step_overhead_s=0.0,
                         layer_overhead_s=0.0)  # fmt: skip
    fit = fit_step_model(synthetic(grid(), params=zero, noise=0.01, seed=5), SPECS, DEVICE)
    p = fit.latency
    assert min(p.step_overhead_s, p.layer_overhead_s, p.seq_overhead_s) >= 0.0
    assert p.flops_efficiency == pytest.approx(0.35, rel=0.1)


def test_fit_bandwidth():
    sizes = [1e8, 3e8, 1.2e9]
    bw, fixed = fit_bandwidth(sizes, [0.05 + s / 4e9 for s in sizes])
    assert bw == pytest.approx(4e9) and fixed == pytest.approx(0.05)
    bw, fixed = fit_bandwidth([5e8], [0.25])
    assert bw == pytest.approx(2e9) and fixed == 0.0


def test_calibrate_rejects_unknown_models(tmp_path, capsys):
    from warmserve.cli import main

    assert main(["calibrate", "--models", "gpt-9", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "unknown model 'gpt-9'" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.slow
def test_calibrate_writes_a_profile_the_simulator_reads(tmp_path, capsys):
    """The command end to end on a small random model (--quick). Nothing is asserted about
    the times themselves, only that they were measured and written."""
    from warmserve.cli import main
    from warmserve.profiles import load_profile

    out = tmp_path / "mine.yaml"
    assert main(["calibrate", "--quick", "--quiet", "--models", "random-2l", "--out",
                 str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "step-time fit: mean |error|" in text
    p = load_profile(str(out))
    assert p.name == "mine" and p.shared_host
    assert p.host.cores >= 1 and p.host.threads_per_device >= 1  # written from the measurement
    assert p.latency.step_overhead_s + p.latency.seq_overhead_s > 0
    assert p.costs.engine_attach_s >= 0 and p.costs.cold_engine_init_s > 0
    report = tmp_path / "mine-report"
    assert (report / "fit.png").stat().st_size > 0
    assert "| random-2l prefill b=1" in (report / "report.md").read_text()
