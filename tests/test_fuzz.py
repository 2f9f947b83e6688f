"""Property-based fuzzing (hypothesis) of what users type and hand over: the configuration (YAML files and dotted
overrides), the ``ppl-vae`` command line, and the data files read by the IDX and image-folder loaders.

The property everywhere: an input ends in a valid result or in one of the library's own errors
(:class:`~ppl_vae.errors.PplVaeError`) with a one-line message — never another exception, never a hang (the
hypothesis deadline). The default suite runs a small, fixed (derandomised) set of examples per property; the same
properties with many more, random examples are marked ``slow`` (``pytest -m slow tests/test_fuzz.py``). The faults
the fuzzing found are kept below as plain regression tests, each with the minimal example hypothesis reported.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import struct
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyro
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ppl_vae.experiment  # noqa: F401  (imported once here, so no example pays for the import)
from ppl_vae.cli import _gather_overrides, main
from ppl_vae.config.sections import (
    _SECTIONS,
    Config,
    config_from_dict,
    load_config,
    load_yaml,
    parse_override,
    save_config,
    shipped_configs,
)
from ppl_vae.data import load_data
from ppl_vae.errors import ConfigError, DataError, PplVaeError

FAST_EXAMPLES, SLOW_EXAMPLES = 60, 1500


def _fuzz(*strategies, deadline_ms: int = 10_000, fast: int = FAST_EXAMPLES, slow: int = SLOW_EXAMPLES):
    """Two tests of one property: the default one (``fast`` fixed examples) and a ``slow`` one (``slow`` random
    examples). Use as ``test_x, test_x_slow = _fuzz(strategy, ...)(body)``."""

    def wrap(body):
        common = {
            "deadline": deadline_ms,
            "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        }
        quick = settings(max_examples=fast, derandomize=True, **common)(given(*strategies)(body))
        thorough = pytest.mark.slow(settings(max_examples=slow, **common)(given(*strategies)(body)))
        return quick, thorough

    return wrap


def _assert_own_error(exc: BaseException, kind: type[PplVaeError] = PplVaeError) -> str:
    """``exc`` is one of the library's errors, of ``kind``, with a one-line message; returns the message."""
    assert isinstance(exc, kind), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert not msg.startswith("unexpected"), msg
    assert len(msg) < 20_000, f"a message of {len(msg)} characters"
    return msg


# --------------------------------------------------------------------------- strategies: keys, values, YAML

FIELDS = {
    "": [f.name for f in fields(Config)],
    **{name: [f.name for f in fields(cls)] for name, cls in _SECTIONS.items()},
}
VALID_PATHS = sorted({*FIELDS[""], *(f"{s}.{k}" for s, names in FIELDS.items() if s for k in names)})
YAML_SPECIALS = [
    *["yes", "no", "on", "off", "y", "n", "True", "FALSE", "~", "null", "Null", ""],
    *[".nan", ".NaN", ".inf", "-.inf", "+.inf", "nan", "inf", "1e400", "-1e400", "1e-400", "1e3", "2E-4", "1.5e+3"],
    *["0x1F", "0o17", "017", "0b101", "1_000", "+1", "-0", "1:20", "190:20:30", "4294967296", "18446744073709551616"],
    *["2001-12-14", "2001-13-01", "2001-12-14t21:59:43.10-05:00", "2001-02-30", "!!int x", "!!float x", "!!str 1"],
    *["!!binary x", "!!timestamp 2001-99-99", "!!bool maybe", "!!null 1", "!!python/name:os.system", "!foo bar"],
    *["&a [*a]", "*nowhere", "'", '"', "'a", '"\\x"', "[", "]", "{", "{a: ]", "[1, {a: ]", "- ", ": ", "? a", "#"],
    *["%YAML 1.1", "---", "...", "\t", "a: b: c", "=", "a=b", ".", "é", "\u2028", "\ufeff", "\x00", "\x85", "\x1b"],
    *["1" * 4400, "[" * 2000, "{a: " * 400, "- " * 500, "vae", "cpu", "cuda:0", "mnist", "m:f", "digits"],
    *["~nouser/m.py", "x/" * 2100 + "m.py", "m.py", "/abs/m.py", "~/m.py"],
]
NAME_PARTS = st.sampled_from(sorted({*FIELDS, *(k for names in FIELDS.values() for k in names)} - {""})) | st.text(
    max_size=6
)
KEYS = st.sampled_from(VALID_PATHS) | st.lists(NAME_PARTS, min_size=1, max_size=4).map(".".join)
BIG_INTS = st.sampled_from([2**31, 2**32 - 1, 2**32, 2**63, 2**64, 10**30, 10**400, -(10**400), -1, 0])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | BIG_INTS
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(YAML_SPECIALS)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(NAME_PARTS | st.sampled_from(YAML_SPECIALS), inner, max_size=3)
    ),
    max_leaves=8,
)


def _value_text(value) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


VALUE_TEXTS = VALUES.map(_value_text) | st.sampled_from(YAML_SPECIALS) | st.text(max_size=16)
OVERRIDES = st.tuples(KEYS, VALUE_TEXTS).map("=".join) | st.text(max_size=16)


def _document(section_values: dict) -> str:
    return yaml.safe_dump(section_values, allow_unicode=True, sort_keys=False)


SECTION_DICTS = st.dictionaries(
    st.sampled_from(sorted({k for names in FIELDS.values() for k in names})) | NAME_PARTS, VALUES, max_size=4
)
DOCUMENT_DICTS = st.dictionaries(
    st.sampled_from(FIELDS[""]) | NAME_PARTS, SECTION_DICTS | VALUES, max_size=5
)  # the top level: sections (mappings) and fields, valid or not
SHIPPED_TEXTS = {name: f.read_text() for name, f in shipped_configs().items()}


@st.composite
def shipped_mutations(draw) -> bytes:
    """A shipped config cut at a random point, with a few bytes flipped or inserted."""
    text = SHIPPED_TEXTS[draw(st.sampled_from(sorted(SHIPPED_TEXTS)))].encode()
    return _mutate(draw, text)


def _mutate(draw, data: bytes, max_ops: int = 3) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["cut", "flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif not data:
            continue
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


# --------------------------------------------------------------------------- properties of a valid configuration


def _check_valid(cfg: Config, values=None) -> None:
    """What a configuration that loaded promises: it validates again, it survives being saved and read back (as a
    run folder's config.yaml is, by --resume and load_run), its seed seeds Pyro, and no section the input gave was
    ignored."""
    assert isinstance(cfg, Config)
    cfg.validate()
    pyro.set_rng_seed(cfg.seed)  # numpy refuses seeds >= 2**32
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        again = load_config(path)
    assert repr(again.to_dict()) == repr(cfg.to_dict())
    if values is not None:  # the input it was built from: nothing in it read as "the defaults"
        assert isinstance(values, dict), f"{values!r} read as the defaults"
        for section in set(_SECTIONS) & set(values):
            assert values[section] is None or isinstance(values[section], dict), (section, values[section])


def _load_outcome(load, *args):
    try:
        cfg = load(*args)
    except PplVaeError as e:
        _assert_own_error(e, ConfigError)
        return None
    return cfg


# --------------------------------------------------------------------------- configuration: overrides


def _overrides_property(overrides: list[str]) -> None:
    cfg = _load_outcome(load_config, None, overrides)
    if cfg is not None:
        _check_valid(cfg)


test_overrides, test_overrides_slow = _fuzz(st.lists(OVERRIDES, max_size=5))(_overrides_property)


def _override_parse_property(text: str) -> None:
    try:
        path, _ = parse_override(text)
    except PplVaeError as e:
        _assert_own_error(e, ConfigError)
        return
    assert path and all(path)


test_parse_override, test_parse_override_slow = _fuzz(OVERRIDES | st.text())(_override_parse_property)


# --------------------------------------------------------------------------- configuration: values and documents


def _dict_property(values) -> None:
    cfg = _load_outcome(config_from_dict, values)
    if cfg is not None:
        _check_valid(cfg, values)


test_config_from_dict, test_config_from_dict_slow = _fuzz(DOCUMENT_DICTS | VALUES)(_dict_property)


def _file_property(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(data)
        cfg = _load_outcome(load_config, path)
    if cfg is not None:
        _check_valid(cfg)
        document = load_yaml(data.decode())
        assert document is None or isinstance(document, dict), f"a document {document!r} read as the defaults"


YAML_FILES = (
    DOCUMENT_DICTS.map(lambda d: _document(d).encode())
    | shipped_mutations()
    | st.text().map(str.encode)
    | st.lists(st.sampled_from(YAML_SPECIALS), max_size=6).map(lambda xs: "\n".join(xs).encode())
    | st.binary(max_size=64)
)
test_config_files, test_config_files_slow = _fuzz(YAML_FILES)(_file_property)


def _options_property(method: str, values) -> None:
    from ppl_vae.models.registry import get_method

    try:
        get_method(method).options.parse(values, method=method)
    except PplVaeError as e:
        _assert_own_error(e, ConfigError)


def _method_names() -> list[str]:
    from ppl_vae.models.registry import model_names

    return sorted(model_names())


test_method_options, test_method_options_slow = _fuzz(
    st.sampled_from(_method_names()), st.dictionaries(NAME_PARTS | SCALARS, VALUES, max_size=4) | VALUES
)(_options_property)


# --------------------------------------------------------------------------- the command line


class _Reached(BaseException):
    """Raised by the stand-in of run_experiment: the arguments parsed and the configuration validated."""

    def __init__(self, cfg):
        super().__init__("reached run_experiment")
        self.cfg = cfg


def _reached(cfg, *args, **kwargs):
    raise _Reached(cfg)


COMMON_FLAGS = ["--checkpoint", "best", "last", "--trust-pickle", "--device", "cpu", "--seed", "-h", "--debug", "--"]
FLAGS = {
    "train": ["--resume", "run", "--run-dir", "--overwrite", "--device", "--no-progress", "--no-figures", "-h", "--"],
    "evaluate": ["--num-samples", "--max-test", *COMMON_FLAGS],
    "diagnose": ["--num-images", "--num-samples", *COMMON_FLAGS],
    "gaps": ["--num-images", "--num-samples", "--steps", "--num-particles", "--elbo-particles", "--family", "diag"]
    + ["full", "--nuts", "--nuts-chains", "--nuts-samples", "--nuts-warmup", *COMMON_FLAGS],
    "sample": ["--n", "--seed", "--out", "x.png", "--from", "prior", "aggregate", "--num-components", *COMMON_FLAGS],
    "configs": ["list", "show", "copy", "fields", "vae_digits", "vae_fashion", "dest.yaml", "guides_laplace", "-h"]
    + ["ladder"],
}
NUMBER_TEXTS = st.integers(-5, 5).map(str) | BIG_INTS.map(str) | st.sampled_from(["1.5", "1e3", "", " 3", "٣", "0x10"])
NAMES = st.sampled_from(
    [*sorted(SHIPPED_TEXTS)[:5], "vae_fashion.yaml", "guides_laplace.yaml", "cfg.yaml", "missing.yaml", "run", ".", ""]
)


def _argv(command: str):
    tokens = st.sampled_from(FLAGS[command]) | NUMBER_TEXTS | NAMES | st.text(max_size=10)
    if command == "train":
        tokens = tokens | OVERRIDES
    head = st.just([command]) if command != "any" else st.lists(st.text(max_size=8), max_size=1)
    return st.tuples(head, st.lists(tokens, max_size=6)).map(lambda t: [*t[0], *t[1]])


ANY_ARGV = st.sampled_from(sorted(FLAGS)).flatmap(_argv) | st.lists(
    st.sampled_from([*FLAGS, "-h"]) | NAMES | st.text(max_size=8), max_size=5
)  # no --debug before the command: with it an error raises, its traceback wanted


def _cli_property(argv: list[str]) -> None:
    """``main(argv)`` in a fresh folder (holding a config file and a run folder to resume), training replaced by
    a stand-in: an exit code with one error line, or argparse's usage and one error line, or the stand-in reached
    with a valid configuration; never 'unexpected', never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        cwd = Path(tmp) / "cwd"
        (cwd / "run").mkdir(parents=True)
        (cwd / "cfg.yaml").write_text(SHIPPED_TEXTS["vae_digits"])
        (cwd / "run" / "config.yaml").write_text(SHIPPED_TEXTS["vae_digits"])
        mp.chdir(cwd)
        mp.setenv("PPL_VAE_CACHE_DIR", str(Path(tmp) / "cache"))
        mp.setattr(ppl_vae.experiment, "run_experiment", _reached)
        reached = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # an old config name: warned, as outside pytest
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse: usage and one error line (2), or the help (0)
                code = e.code
                assert code in (0, 2), code
            except _Reached as r:
                reached, code = r.cfg, 0
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text and "unexpected" not in err.getvalue(), text
    if reached is not None:
        _check_valid(reached)
    elif code != 0:
        lines = err.getvalue().strip().splitlines()
        assert lines and lines[-1].startswith("ppl-vae") and " error: " in lines[-1], err.getvalue()
        if not (code == 2 and lines[0].startswith("usage: ")):  # else argparse's: the usage, then its one line
            assert len(lines) == 1, err.getvalue()


test_cli, test_cli_slow = _fuzz(ANY_ARGV)(_cli_property)


def _gather_property(argv: list[str]) -> None:
    kept, overrides = _gather_overrides(list(argv))
    assert sorted(kept + overrides) == sorted(argv)  # nothing lost, nothing added
    command = next((a for a in argv if not a.startswith("-")), None)
    if command != "train":
        assert (kept, overrides) == (argv, []), "overrides are taken out after `train` only"


test_gather_overrides, test_gather_overrides_slow = _fuzz(ANY_ARGV)(_gather_property)


# --------------------------------------------------------------------------- data files: IDX

FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train-images-idx3-ubyte": ("train-images-idx3-ubyte.gz", 50),
    "train-labels-idx1-ubyte": ("train-labels-idx1-ubyte.gz", 50),
    "t10k-images-idx3-ubyte": ("t10k-images-idx3-ubyte.gz", 20),
    "t10k-labels-idx1-ubyte": ("t10k-labels-idx1-ubyte.gz", 20),
}


def _small_idx() -> dict[str, bytes]:
    """The first images and labels of the real Fashion-MNIST files (Debian's dataset-fashion-mnist) as small
    valid IDX files; synthetic ones of the same layout where the package is not installed."""
    out = {}
    rng = np.random.default_rng(0)
    for stem, (gz, n) in IDX_STEMS.items():
        image = "images" in stem
        if (FASHION / gz).is_file():
            with gzip.open(FASHION / gz, "rb") as f:
                head = f.read(16 if image else 8)
                body = f.read(n * 784 if image else n)
        else:
            body = rng.integers(0, 256 if image else 10, n * 784 if image else n, dtype=np.uint8).tobytes()
        out[stem] = (struct.pack(">IIII", 0x803, n, 28, 28) if image else struct.pack(">II", 0x801, n)) + body
        if (FASHION / gz).is_file():
            assert head[:4] == out[stem][:4]
    return out


IDX = _small_idx()


@st.composite
def idx_cases(draw):
    """The four files, one or two of them mutated, written plain or gzipped; read in memory or memory-mapped."""
    files = dict(IDX)
    mutated = draw(st.lists(st.sampled_from(sorted(IDX)), min_size=1, max_size=2, unique=True))
    gz = draw(st.booleans())
    for stem in mutated:
        data = files[stem]
        if gz and draw(st.booleans()):  # the compressed bytes mutated
            files[stem] = _mutate(draw, gzip.compress(data, mtime=0))
            continue
        # most flips where they matter: the header
        pos = draw(st.integers(0, 15) | st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["cut", "flip", "set"]))
        data = bytearray(data)
        if op == "cut":
            del data[pos:]
        elif op == "flip":
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        else:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        files[stem] = gzip.compress(bytes(data), mtime=0) if gz else bytes(data)
    for stem in set(files) - set(mutated):
        files[stem] = gzip.compress(files[stem], mtime=0) if gz else files[stem]
    return files, mutated, gz, draw(st.sampled_from(["memory", "uint8", "mmap"]))


def _check_images(bundle, shape) -> None:
    for split in ("train", "val", "test"):
        x, y = bundle.split(split)
        x = x.float()  # a tensor, or Images (uint8, mmap, files) read whole
        assert tuple(x.shape[1:]) == shape and len(y) == len(x)
        assert bool(x.isfinite().all()) and (len(x) == 0 or (float(x.min()) >= 0 and float(x.max()) <= 1))


def _idx_property(case) -> None:
    files, mutated, gz, storage = case
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        folder = Path(tmp) / "fashion"
        folder.mkdir()
        for stem, data in files.items():
            (folder / (f"{stem}.gz" if gz else stem)).write_bytes(data)
        mp.setenv("PPL_VAE_CACHE_DIR", str(Path(tmp) / "cache"))
        try:
            bundle = load_data("fashion_mnist", root=folder, storage=storage, val_fraction=0.2)
        except PplVaeError as e:
            assert isinstance(e, DataError), f"{type(e).__name__}: {e}"
            assert any(stem in str(e) for stem in mutated), f"names none of {mutated}: {e}"
            event(f"DataError: {str(e).replace(str(folder), '')[:70]}")
            return
        event("loaded")
        _check_images(bundle, (1, 28, 28))
        assert int(bundle.train_y.max()) < 10 and int(bundle.train_y.min()) >= 0


test_idx_files, test_idx_files_slow = _fuzz(idx_cases(), deadline_ms=20_000)(_idx_property)


# --------------------------------------------------------------------------- data files: PNG and JPEG (image_folder)


def _small_images() -> dict[str, bytes]:
    """A few real image files written by PIL: PNGs of several modes and JPEGs, 9x12 pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    out = {}
    for name, image, fmt in [
        ("rgb.png", Image.fromarray(rgb), "PNG"),
        ("grey.png", Image.fromarray(rgb[..., 0]), "PNG"),
        ("palette.png", Image.fromarray(rgb).convert("P"), "PNG"),
        ("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
        ("wide.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        ("rgb.jpg", Image.fromarray(rgb), "JPEG"),
        ("grey.jpg", Image.fromarray(rgb[..., 1]), "JPEG"),
    ]:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


IMAGES = _small_images()


@st.composite
def image_cases(draw):
    name = draw(st.sampled_from(sorted(IMAGES)))
    return name, _mutate(draw, IMAGES[name]), draw(st.sampled_from(["memory", "files"]))


def _image_property(case) -> None:
    name, data, storage = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            for other in ("rgb.png", "grey.jpg"):
                (root / c / f"ok_{other}").write_bytes(IMAGES[other])
        bad = root / "a" / f"fuzz_{name}"
        bad.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # PIL's DecompressionBombWarning, say: refused, not read
                bundle = load_data("image_folder", root=root, image_size=8, storage=storage, val_fraction=0.2)
                _check_images(bundle, (3, 8, 8))
            event("loaded")
        except PplVaeError as e:
            assert isinstance(e, DataError), f"{type(e).__name__}: {e}"
            assert str(bad) in str(e) or bad.name in str(e), f"does not name {bad.name}: {e}"
            event(f"DataError: {str(e).replace(str(root), '')[:90]}")


test_image_files, test_image_files_slow = _fuzz(image_cases(), deadline_ms=20_000)(_image_property)


# --------------------------------------------------------------------------- regressions: the faults fuzzing found


@pytest.mark.parametrize(
    "override",
    [
        "data=!!bool maybe",  # KeyError in PyYAML's bool constructor (hypothesis' example)
        "seed=!!timestamp x",  # AttributeError in its timestamp constructor
        "seed=2001-13-01",  # ValueError: month must be in 1..12
        "seed=!!int x",  # ValueError
        "seed=" + "1" * 4400,  # ValueError: more than 4300 digits
        "model.hidden=" + "[" * 2000,  # RecursionError
        "seed=a: b: c",  # a YAML error: PyYAML's message spans three lines
        "seed='\x00'",  # a ReaderError: two lines
    ],
)
def test_a_value_pyyaml_cannot_read_is_a_one_line_config_error(override):
    with pytest.raises(ConfigError, match="could not parse the value of override") as err:
        load_config(None, [override])
    _assert_own_error(err.value, ConfigError)


@pytest.mark.parametrize("text", ["!!timestamp", "seed: 2001-13-01", "a: b: c\n", "[" * 2000, "train: [1, 2\n"])
def test_a_file_pyyaml_cannot_read_is_a_one_line_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is not valid YAML") as err:
        load_config(path)
    msg = _assert_own_error(err.value, ConfigError)
    if text == "a: b: c\n":
        assert msg.endswith("mapping values are not allowed here (line 1, column 5)")


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text \(byte 0xe9 at position 9\)") as err:
        load_config(path)
    _assert_own_error(err.value)
    with pytest.raises(ConfigError, match="cannot be read: File name too long") as err:
        load_config("x" * 300)  # OSError (ENAMETOOLONG) from Path.is_file before
    _assert_own_error(err.value)


def test_an_integer_too_large_for_a_float_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.lr must be a positive number, got 1111.*\.\.\.") as err:
        load_config(None, ["train.lr=" + "1" * 400])  # OverflowError: int too large to convert to float
    _assert_own_error(err.value)
    with pytest.raises(ConfigError, match="train.min_elbo must be a number"):
        config_from_dict({"train": {"min_elbo": -(10**400)}})


def test_the_seed_is_one_numpy_and_pyro_take():
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 4294967295\], got 4294967296"):
        load_config(None, ["seed=4294967296"])  # accepted before; pyro.set_rng_seed raised ValueError at training
    pyro.set_rng_seed(load_config(None, ["seed=4294967295"]).seed)
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["evaluate", "run", "--seed", "4294967296"])
    assert exit_.value.code == 2 and "--seed: must be an integer in [0, 4294967295], got 4294967296" in err.getvalue()


@pytest.mark.parametrize("value,shown", [("0", "0"), ("[]", "[]"), ("false", "False"), ("''", "''"), ("5", "5")])
def test_a_section_that_is_not_a_mapping_is_refused(value, shown):
    with pytest.raises(ConfigError, match=re.escape(f"data must be a mapping, got {shown}")):
        load_config(None, [f"data={value}"])  # 0, [], false and '' meant the defaults before
    assert load_config(None, ["data="]).data == Config().data  # `data:` with nothing: the defaults


@pytest.mark.parametrize(
    "values",
    [{"name": "1e3"}, {"output_dir": "2E-4"}, {"data": {"root": "5e10"}}, {"model": {"options": {"a": "1e-3"}}}],
)
def test_a_saved_config_reads_back_as_it_was(tmp_path, values):
    cfg = config_from_dict(values)
    save_config(cfg, tmp_path / "config.yaml")  # a string like 1e3 was written bare, then read back as a float
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()


def test_a_value_of_nested_aliases_is_refused_in_bounded_time(tmp_path):
    """10 aliases of 10 aliases ... 8 deep: a list of 10**9 ones, whose repr in the message never ended."""
    levels = "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
    path = tmp_path / "laughs.yaml"
    path.write_text("model:\n  options:\n    l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + levels + "  hidden: *l8\n")
    with pytest.raises(ConfigError, match=r"model.hidden must be a list of positive integers, got \[\[\[") as err:
        load_config(path)
    assert len(_assert_own_error(err.value)) < 10_000


def test_method_options_with_keys_of_several_types_are_a_config_error():
    from ppl_vae.models.registry import get_method

    with pytest.raises(ConfigError, match=r"model.options has unknown keys \[1, 'a'\]"):
        get_method("vae").options.parse({1: 2, "a": 3}, method="vae")  # TypeError from sorted() before


@pytest.mark.parametrize("entry", ["~nosuchuser/m.py", "a/" * 2100 + "m.py"])
def test_an_imports_entry_the_file_system_cannot_resolve_loads(tmp_path, entry):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"imports": [entry]}))
    assert load_config(path).imports == [entry]  # RuntimeError (unknown user) or OSError (too long) before


def test_overrides_are_taken_after_the_train_command_only():
    assert _gather_overrides(["evaluate", "train", "="]) == (["evaluate", "train", "="], [])  # hypothesis' example
    assert _gather_overrides(["--debug", "train", "a=b", "--device", "c=d"]) == (
        ["--debug", "train", "--device", "c=d"],
        ["a=b"],
    )
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["evaluate", "train", "x=1"])  # x=1 was dropped silently, and the run folder 'train' evaluated
    assert "unrecognized arguments: x=1" in err.getvalue()


def test_an_argument_with_control_characters_is_shown_escaped():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["configs", "list", "\r0\x1b[2J"])  # hypothesis' example: ['configs', 'list', '\r0']
    last = err.getvalue().strip().splitlines()[-1]
    assert last == "ppl-vae: error: unrecognized arguments: \\r0\\x1b[2J" and "\x1b" not in err.getvalue()


def test_an_idx_header_that_does_not_fit_says_so(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    for stem, data in IDX.items():
        (folder / stem).write_bytes(data)
    broken = bytearray(IDX["train-images-idx3-ubyte"])
    broken[3] = 5  # 5 dimensions: torchvision's bare assert
    (folder / "train-images-idx3-ubyte").write_bytes(bytes(broken))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPL_VAE_CACHE_DIR", str(tmp_path / "cache"))
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte: its header \(type, dimensions\) does not fit"):
            load_data("fashion_mnist", root=folder)


@pytest.mark.parametrize("text,kind", [("0", "int"), ("false", "bool"), ("[]", "list"), ("''", "str")])
def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"must hold a mapping of sections, got {kind}"):
        load_config(path)  # the defaults before
    path.write_text("# only a comment\n")
    assert load_config(path).to_dict() == Config().to_dict()
    with pytest.raises(ConfigError, match=r"the configuration must be a mapping, got \[\]"):
        config_from_dict([])
