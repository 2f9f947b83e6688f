"""Configuration: YAML + dotted overrides, validation errors that name the field and the value."""

from pathlib import Path

import pytest

from ppl_vae.config import Config, ModelConfig, apply_overrides, load_config, parse_override
from ppl_vae.data.multimodal import Layout
from ppl_vae.errors import ConfigError
from ppl_vae.models import build_model, get_method, model_names
from ppl_vae.training import plan_for

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_digits_config():
    assert load_config(CONFIGS[0].parent / "vae_digits.yaml").to_dict() == Config().validate().to_dict()


SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "kmnist": (1, 28, 28),
    "omniglot": (1, 28, 28),
    "celeba": (3, 64, 64),
}


def build_from_config(cfg):
    """Everything a run builds from a config before the first step: the model (its typed options validated), its
    plan, every stage's settings and objective."""
    shape = SHAPES[cfg.data.name]
    if cfg.data.multimodal == "poly":
        shape = Layout(
            tuple(f"m{m}" for m in range(cfg.data.num_modalities)),
            (shape,) * cfg.data.num_modalities,
            ("image",) * cfg.data.num_modalities,
        )
    elif cfg.data.multimodal == "image_label":
        shape = Layout(("image", "label"), (shape, (10,)), ("image", "label"))
    model = build_model(cfg.model, shape, num_data=1000, num_classes=None if cfg.data.name == "celeba" else 10)
    plan = plan_for(model)
    for stage in plan.stages(cfg.train):
        stage.train.validate()
        plan.objective(stage.train)
    return model


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_its_model_plan_and_objectives(path):
    cfg = load_config(path)
    assert cfg.model.name in model_names()  # current names, not deprecated aliases
    build_from_config(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_bad_option_in_a_shipped_config_fails_with_its_field(path):
    cfg = load_config(path, ["model.options.no_such_option=1"])
    with pytest.raises(ConfigError, match=r"model.options has unknown keys \['no_such_option'\]"):
        build_from_config(cfg)
    for field, (default, _) in get_method(cfg.model.name).options.describe().items():
        bad = "not-a-valid-value" if not isinstance(default, str) else 12345
        broken = load_config(path, [f"model.options.{field}={bad}"])
        with pytest.raises(ConfigError, match=rf"model\.options\.{field} must be .*, got"):
            build_from_config(broken)


def test_overrides_are_parsed_as_yaml_and_nest():
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("model.hidden=[64, 32]") == (["model", "hidden"], [64, 32])
    assert parse_override("data.root=/tmp/x") == (["data", "root"], "/tmp/x")
    cfg = load_config(None, ["train.epochs=3", "model.latent_dim=8", "train.lr=1", "model.options.k=2"])
    assert (cfg.train.epochs, cfg.model.latent_dim, cfg.train.lr, cfg.model.options) == (3, 8, 1.0, {"k": 2})
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.latent_dim=-3", "model.latent_dim must be a positive integer, got -3"),
        ("model.latent_dim=2.5", "model.latent_dim must be a positive integer, got 2.5"),
        ("train.lr=0", "train.lr must be a positive number, got 0"),
        ("train.epochs=true", "train.epochs must be a positive integer, got True"),
        ("data.name=cifar", "data.name must be one of"),
        ("data.pixels=grey", "data.pixels must be one of"),
        ("data.val_fraction=1", "data.val_fraction must be a number in [0, 1), got 1"),
        ("model.likelihood=poisson", "model.likelihood must be one of"),
        ("train.objective=vi", "train.objective must be one of"),
        ("train.lr_schedule=linear", "train.lr_schedule must be one of"),
        ("model.hidden=[64,-1]", "model.hidden must be a list of positive integers, got [64, -1]"),
        ("device=tpu", "device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"),
        ("train.epoch=3", "unknown field 'train.epoch'"),
        ("nonsense=1", "unknown field 'nonsense'"),
        ("train=3", "train must be a mapping"),
        (
            "train.objective=iwae train.kl_warmup_epochs=3",
            "train.kl_warmup_epochs must be 0 with train.objective='iwae'",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split(" "))
    assert message in str(err.value)


def test_unknown_model_name_lists_the_registered_ones():
    cfg = load_config(None, ["model.name=vea"])
    with pytest.raises(ConfigError, match=r"model.name must be one of \[.*'vae'.*\], got 'vea'"):
        build_model(cfg.model, (1, 8, 8), num_data=10)
    cfg = load_config(None, ["model.options.bogus=1"])
    with pytest.raises(ConfigError, match=r"model.options has unknown keys \['bogus'\]"):
        build_model(cfg.model, (1, 8, 8), num_data=10)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("epochs")


def test_a_shipped_config_loads_by_its_earlier_name_with_a_warning():
    from ppl_vae.config.sections import RENAMED_CONFIGS

    root = Path(__file__).resolve().parents[2] / "configs"
    for old, new in RENAMED_CONFIGS.items():
        assert not (root / old).exists() and (root / new).is_file(), (old, new)
    with pytest.warns(DeprecationWarning, match="guides_laplace.yaml is now called vlae_fashion.yaml"):
        cfg = load_config(root / "guides_laplace.yaml")
    assert cfg.name == "vlae_fashion" and cfg.model.name == "vlae"


def test_method_rules_live_in_the_builders():
    """vae2's architectures and burda2's one method are checked where the model is built, with field and value."""
    with pytest.raises(ConfigError, match="model.arch='burda2' is the two-stochastic-layer architecture"):
        build_model(ModelConfig(name="vae", arch="burda2"), (1, 8, 8), num_data=10)
    with pytest.raises(ConfigError, match="model.arch must be 'burda2' or 'mlp' for model.name='vae2', got 'conv'"):
        build_model(ModelConfig(name="vae2", arch="conv"), (1, 8, 8), num_data=10)
    with pytest.raises(ConfigError, match="model.name='cvae' needs a dataset with class labels"):
        build_model(ModelConfig(name="cvae"), (1, 8, 8), num_data=10, num_classes=None)
