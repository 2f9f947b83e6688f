"""The rule (issue 33, item 9): every fault a user can cause ends in one line of the library's own words with exit 2
(the fallback "unexpected ..." is for bugs only). This test walks the CLI through one case of each fault class; the
cases that need a process or a device of their own (a full disk, an unreachable logger, a broken image read by a
worker) have their own tests beside the code that maps them, asserting the same."""

import textwrap

import pytest

from ppl_vae.cli import main

FAST = ["train.epochs=1", "model.hidden=[16]", "data.limit=300", "--no-progress", "--no-figures"]


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _config(tmp_path, imports):
    return _file(tmp_path, "cfg.yaml", f"imports: [{imports}]\nmodel: {{name: vae, hidden: [16]}}\n")


CASES = {
    "a misspelt method": (lambda t: ["train", "model.name=sigma_vea", *FAST], ["did you mean 'sigma_vae'?"]),
    "a misspelt dataset": (lambda t: ["train", "data.name=fashon", *FAST], ["did you mean 'fashion_mnist'?"]),
    "a misspelt field": (lambda t: ["train", "train.epoch=3", *FAST], ["did you mean 'train.epochs'"]),
    "a misspelt option": (
        lambda t: ["train", "model.name=sigma_vae", "model.options.stage2_epoch=2", *FAST],
        ["did you mean 'model.options.stage2_epochs'"],
    ),
    "a misspelt shipped config": (lambda t: ["train", "vae_fashoin", *FAST], ["did you mean 'vae_fashion'"]),
    "an imports file that raises": (
        lambda t: ["train", str(_config(t, _file(t, "boom.py", "x = 1\nraise RuntimeError('no GPU here')\n"))), *FAST],
        ["boom.py' failed at line 2: RuntimeError: no GPU here"],
    ),
    "an imports file with a syntax error": (
        lambda t: ["train", str(_config(t, _file(t, "bad.py", "def f(:\n    pass\n"))), *FAST],
        ["bad.py' failed at line 1: SyntaxError"],
    ),
    "a builder of the wrong signature": (
        lambda t: [
            "train",
            str(
                _config(
                    t,
                    _file(t, "m.py", "import ppl_vae\n@ppl_vae.register_model('mine')\ndef build(cfg):\n    pass\n"),
                )
            ),
            *FAST,
        ],
        ["must take (cfg, options, data_shape, num_data, num_classes), got (cfg)"],
    ),
    "a unimodal model on multimodal data": (
        lambda t: ["train", "model.name=vae", "data.multimodal=poly", *FAST],
        ["models one image per datapoint, but the data are multimodal"],
    ),
    "a multimodal model on images": (lambda t: ["train", "model.name=mmvae", *FAST], ["is a multimodal model"]),
    "a latent size that cannot be allocated": (
        lambda t: ["train", "model.latent_dim=100000000000", *FAST],
        ["needs more memory than there is"],
    ),
    "a config that does not exist": (lambda t: ["train", str(t / "none.yaml"), *FAST], ["does not exist"]),
    "a run folder that is not one": (lambda t: ["evaluate", str(t)], ["is not a run folder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_a_user_causes_is_one_line_of_our_own_words_with_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needles = CASES[case]
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("ppl-vae: error: "), err  # notes before it start with "ppl-vae: " too
    assert all(line.startswith("ppl-vae: ") and "error" not in line for line in lines[:-1]), err
    assert "unexpected" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
