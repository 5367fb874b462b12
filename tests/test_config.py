"""GivaConfig validation: bad values name the field, what was given and what is allowed."""

import pytest
from peft import PeftConfig

from giva import GIVA_PEFT_TYPE, GivaConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "GivaConfig.r must be a positive integer, got 0"),
        ({"r": 2.5}, "GivaConfig.r must be a positive integer"),
        ({"variant": "Ur"}, "GivaConfig.variant must be one of .*'Vr'.*got 'Ur'"),
        ({"svd": "fast"}, "GivaConfig.svd must be one of"),
        ({"giva_dropout": 1.0}, "GivaConfig.giva_dropout must be in \\[0, 1\\)"),
        ({"bias": "lora_only"}, "GivaConfig.bias must be one of"),
        ({"layers_pattern": "layer"}, "layers_pattern is only used with layers_to_transform"),
        ({"block_sizes": {"c_attn": [3, 0]}}, "GivaConfig.block_sizes\\['c_attn'\\] must be"),
        ({"adapt_blocks": {"c_attn": []}}, "GivaConfig.adapt_blocks\\['c_attn'\\] must be"),
        ({"layers_to_transform": []}, "GivaConfig.layers_to_transform must be .*non-empty list.*got \\[\\]"),
        ({"target_modules": "query("}, "GivaConfig.target_modules 'query\\(' is not a valid regular expression"),
        ({"target_modules": ["query", 123]}, "GivaConfig.target_modules must list module names .*'123'"),
        ({"target_modules": 5}, "GivaConfig.target_modules must be a module-name regex string or a list"),
        ({"exclude_modules": ["key", ""]}, "GivaConfig.exclude_modules must list module names"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GivaConfig(**kwargs)


def test_every_field_has_help_text():
    from dataclasses import fields

    own = [f for f in fields(GivaConfig) if f.name not in {f.name for f in fields(PeftConfig)}]
    assert own and all(f.metadata.get("help") for f in own)


def test_config_round_trips_through_peft(tmp_path):
    config = GivaConfig(r=4, target_modules=["query"], variant="VrUr", block_sizes={"c_attn": 3})
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GivaConfig) and loaded.peft_type == GIVA_PEFT_TYPE
    assert (loaded.r, loaded.variant, loaded.block_sizes) == (4, "VrUr", {"c_attn": 3})
