"""i2am.TraceConfig: every trace setting checked once, errors naming the setting; the convention
follows the protocol unless given; trace/recording/Recorder take a config or its keywords."""
import dataclasses

import pytest
import torch

import i2am
import tiny_models as tm
from i2am import protocols
from i2am.config import TraceConfig


@pytest.mark.parametrize("options, error, message", [
    (dict(ref_grid=(0, 3)), ValueError, r"ref_grid \(hI, wI\) must be positive, got \(0, 3\)"),
    (dict(ref_grid="layers"), ValueError, "ref_grid must be \\(hI, wI\\) or 'layer', got 'layers'"),
    (dict(ref_grid=(2, 2), ref_size=(4, 4)), ValueError, "ref_size sets the common grid of ref_grid='layer'"),
    (dict(ref_grid="layer", patches=[(0, 0)]), ValueError, "patches with ref_grid='layer' need ref_size"),
    (dict(time_groups=0), ValueError, "time_groups must be a positive integer, got 0"),
    (dict(num_steps=2, time_groups=3), ValueError, "time_groups=3 is more than the 2 steps"),
    (dict(branch="both"), ValueError, "branch must be one of"),
    (dict(backend="cpu"), ValueError, "backend must be one of"),
    (dict(resize="area"), ValueError, "resize must be one of"),
    (dict(protocol="mine"), ValueError, "protocol must be one of"),
    (dict(convention="mine"), ValueError, "convention must be one of"),
    (dict(protocol="official", convention="paper"), ValueError, "protocol='official' reads C .* use "
                                                                "convention='official', not 'paper'"),
    (dict(layers=3), TypeError, "layers must be fnmatch name patterns"),
    (dict(points=(1, 2)), TypeError, r"points must be a list of \(row, col\) pairs"),
    (dict(mask=torch.full((4, 4), 2.0)), ValueError, r"mask must hold values in \[0, 1\]"),
    (dict(cfg="yes"), TypeError, "cfg must be True, False or None"),
])
def test_each_bad_setting_is_an_error_naming_it(options, error, message):
    with pytest.raises(error, match=message):
        TraceConfig(**options)


def test_a_config_is_frozen_and_normalised():
    config = TraceConfig(ref_grid=[2, 3], points=[[1, 2]], mask=[[0, 1], [1, 0]], num_steps=torch.tensor(4))
    assert config.ref_grid == (2, 3) and config.points == ((1, 2),) and config.num_steps == 4
    assert config.mask.dtype == torch.float32 and config.mask.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.time_groups = 2
    changed = config.replace(time_groups=2)
    assert (changed.time_groups, config.time_groups, changed.ref_grid) == (2, 1, (2, 3))
    with pytest.raises(ValueError, match="time_groups=5 is more than the 4 steps"):
        config.replace(time_groups=5)  # a copy is checked as well


@pytest.mark.parametrize("protocol", sorted(protocols.PROTOCOLS))
def test_convention_none_follows_the_protocol(protocol):
    config = TraceConfig(protocol=protocol)
    assert config.convention == protocols.get(protocol).convention == "official"
    rec = i2am.Recorder(ref_grid=(1, 1), protocol=protocol)
    assert rec.convention == config.convention


def test_an_explicit_convention_is_kept():
    assert TraceConfig(convention="paper").convention == "paper"
    assert TraceConfig(protocol="official", convention="official").convention == "official"


def test_trace_takes_a_config_or_its_keywords_alike():
    """trace(pipe, config) and trace(pipe, **keywords) record the same maps; keywords given with a
    config change it; a non-config positional argument is an error."""
    unet = tm.unet()
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, *tm.LATENT, generator=g), "timestep": torch.tensor(10),
              "encoder_hidden_states": torch.randn(2, 13, tm.CROSS_DIM, generator=g)}
    settings = dict(ref_grid=(3, 4), num_steps=2, time_groups=2, points=[(1, 2)], backend="torch")
    maps = []
    for make in (lambda: i2am.trace(unet, **settings),
                 lambda: i2am.trace(unet, TraceConfig(**settings)),
                 lambda: i2am.trace(unet, TraceConfig(**{**settings, "time_groups": 1}), time_groups=2)):
        with torch.no_grad(), make() as tc:
            for _ in range(2):
                unet(**inputs)
        maps.append(tc.maps())
    for other in maps[1:]:
        assert other.time_groups == 2
        torch.testing.assert_close(other.generated(by="time", normalize=False),
                                   maps[0].generated(by="time", normalize=False), rtol=0, atol=0)
        torch.testing.assert_close(other.specific_reference((1, 2), normalize=False),
                                   maps[0].specific_reference((1, 2), normalize=False), rtol=0, atol=0)
    with pytest.raises(TypeError, match="config must be an i2am.TraceConfig, got dict"):
        i2am.trace(unet, settings)
