"""The configs shipped inside the package (ppl_vae/configs/, package data): found by name through importlib.resources,
a file's path always winning over a name, one clear line for an unknown name, and the root `configs` link of a clone
that keeps every `configs/X.yaml` path of the README, the benchmarks and the notebooks working."""

import re
import warnings
from pathlib import Path

import pytest

from ppl_vae.config.sections import load_config, shipped_config, shipped_configs
from ppl_vae.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PKG_CONFIGS = REPO / "ppl_vae" / "configs"
THIS = Path(__file__).name  # its paths are made up on purpose


def test_the_shipped_configs_are_the_package_folder():
    shipped = shipped_configs()
    assert list(shipped) == sorted(p.stem for p in PKG_CONFIGS.glob("*.yaml")) and "vae_digits" in shipped
    assert shipped["vae_fashion"].read_text() == (PKG_CONFIGS / "vae_fashion.yaml").read_text()
    for name in shipped:
        load_config(name)  # every shipped config is valid


def test_a_name_with_or_without_yaml_loads_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    for given in ("vae_fashion", "vae_fashion.yaml"):
        cfg = load_config(given, ["train.epochs=3"])
        assert cfg.name == "vae_fashion" and cfg.data.name == "fashion_mnist" and cfg.train.epochs == 3
    assert load_config(Path("mae_fashion14")).data.image_size == 14


def test_a_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae_fashion.yaml").write_text("name: mine\nmodel:\n  latent_dim: 7\n")
    for given in ("vae_fashion.yaml", "./vae_fashion.yaml", tmp_path / "vae_fashion.yaml"):
        cfg = load_config(given)
        assert cfg.name == "mine" and cfg.model.latent_dim == 7, given
    assert load_config("vae_fashion").name == "vae_fashion"  # no file called "vae_fashion": the shipped one
    (tmp_path / "vae_digits").mkdir()
    with pytest.raises(ConfigError, match="'vae_digits' is a folder: give a YAML file or the name of a shipped"):
        load_config("vae_digits")


def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("vae_fasion")
    msg = str(e.value)
    assert msg.startswith("config file 'vae_fasion' does not exist, and no shipped config is called 'vae_fasion'")
    assert all(name in msg for name in shipped_configs()) and "`ppl-vae configs`" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="no shipped config is called 'nope'; shipped configs: cvae_digits, "):
        shipped_config("nope.yaml")


def test_a_missing_path_names_the_shipped_config_of_that_name(tmp_path, monkeypatch):
    """Installed from a wheel, `configs/vae_fashion.yaml` is not there: the error says what to type instead."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'configs/vae_fashion.yaml' does not exist; .*`ppl-vae train vae_fashion`"):
        load_config("configs/vae_fashion.yaml")
    with pytest.raises(ConfigError, match=r"^config file 'configs/mine.yaml' does not exist$"):
        load_config("configs/mine.yaml")


def test_an_earlier_name_loads_by_name_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(DeprecationWarning, match="guides_laplace is now called vlae_fashion") as record:
        cfg = load_config("guides_laplace.yaml")
    assert cfg.name == "vlae_fashion" and Path(record[0].filename) == Path(__file__)  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert shipped_config("iwae_fashion")[0] == "vae2_fashion_iwae"


def test_the_root_configs_link_keeps_every_documented_path_working():
    root = REPO / "configs"
    if not root.is_symlink():
        pytest.skip("not a clone (an unpacked sdist holds copies in configs/)")
    assert root.resolve() == PKG_CONFIGS.resolve() and not Path(root.readlink()).is_absolute()
    texts = [REPO / "README.md", REPO / "ARCHITECTURE.md", *(REPO / "bench").glob("*.py"), REPO / "bench" / "README.md"]
    texts += [*(REPO / "notebooks").glob("*.ipynb"), *(p for p in (REPO / "tests").rglob("*.py") if p.name != THIS)]
    texts += [*(REPO / "docs").rglob("*.md")]
    paths = {m for t in texts for m in re.findall(r"configs/[A-Za-z0-9_]+\.yaml", t.read_text())}
    assert paths, "no document names a configs/ path: the check below would check nothing"
    assert not [p for p in sorted(paths) if not (REPO / p).is_file()]
