"""Start-up and threads (issue 37, item 5): `ppl-vae --help` and argument errors answer without importing torch,
`import ppl_vae` imports no submodule until a name is used, and a run's CPU threads come from `train.threads`
(null: half the cores, 1 to 4 — torch's one thread per core collapses beside another busy process); training
flushes denormal floats (``train.flush_denormal``)."""

import subprocess
import sys

import pytest
import torch

from ppl_vae.cli import main
from ppl_vae.nn.device import auto_threads, denormals_flushed, flush_denormals, use_threads

PROBE = "import sys\n{code}\nprint(sorted(m for m in ('torch', 'pyro', 'matplotlib', 'arviz') if m in sys.modules))"


def _imported(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_help_and_argument_errors_do_not_import_torch():
    help_code = "from ppl_vae.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _imported(help_code) == "[]"
    bad_code = "from ppl_vae.cli import main\ntry:\n    main(['train', '--no-such-flag'])\nexcept SystemExit:\n    pass"
    assert _imported(bad_code) == "[]"


def test_import_ppl_vae_is_lazy_and_every_public_name_still_resolves():
    assert _imported("import ppl_vae") == "[]"
    import ppl_vae

    for name in ppl_vae.__all__:
        assert getattr(ppl_vae, name) is not None, name
    assert ppl_vae.training.train is ppl_vae.train  # subpackages resolve as attributes too
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ppl_vae.nope  # noqa: B018


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_auto_threads_are_half_the_cores_from_1_to_4(cores, threads):
    assert auto_threads(cores) == threads


def test_train_threads_sets_torch_and_the_flag_works_before_or_after_the_command(tmp_path):
    before = torch.get_num_threads()
    try:
        assert use_threads(2) == 2 and torch.get_num_threads() == 2
        fast = ["train.epochs=1", "model.hidden=[16]", "data.limit=200", "--no-progress", "--no-figures"]
        assert main(["--threads", "1", "train", "--run-dir", str(tmp_path / "a"), *fast]) == 0
        assert torch.get_num_threads() == 1
        assert "threads: 1" in (tmp_path / "a" / "config.yaml").read_text()
        use_threads(2)
        assert main(["evaluate", str(tmp_path / "a"), "--num-samples", "0", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_flush_denormals_is_scoped_and_restores_the_mode():
    assert not denormals_flushed()  # torch's default
    tiny = torch.tensor(1e-38)
    with flush_denormals() as on:
        assert on and denormals_flushed()
        assert float(tiny * 1e-2) == 0.0  # 1e-40 is a denormal: flushed
        with flush_denormals() as again:  # already on: left as it is
            assert again
        assert denormals_flushed()
    assert not denormals_flushed() and float(tiny * 1e-2) > 0.0


@pytest.mark.parametrize("flush", [True, False])
def test_training_flushes_denormals_only_when_set_and_restores_after(tmp_path, monkeypatch, flush):
    """``train.flush_denormal`` (default on): the training steps run with denormals flushed (CPU arithmetic on them
    is tens of times slower: bench/denormals.py); after the run the process is as it was."""
    import ppl_vae.training.loop as loop

    seen = []
    real_step = loop._Loop.step

    def step(self, *a, **k):
        seen.append(denormals_flushed())
        return real_step(self, *a, **k)

    monkeypatch.setattr(loop._Loop, "step", step)
    fast = ["train.epochs=1", "model.hidden=[16]", "data.limit=200", "--no-progress", "--no-figures"]
    assert main(["train", "--run-dir", str(tmp_path / "a"), f"train.flush_denormal={flush}", *fast]) == 0
    assert seen and set(seen) == {flush}
    assert not denormals_flushed()
