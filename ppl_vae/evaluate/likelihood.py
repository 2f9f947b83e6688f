r"""Importance-sampled log-likelihood of held-out data (Burda, Grosse & Salakhutdinov 2016, §5).

    log p̂(x_i) = logmeanexp_{k≤S} log w_ik,   log w_ik = log p(x_i, z_ik) − log q(z_ik | x_i),   z_ik ~ q(z | x_i)

in nats per datapoint. This is the IWAE bound L_S(x_i) with S samples: a stochastic lower bound in expectation
(E log p̂ ≤ log p(x_i), Jensen) that converges to log p(x_i) as S grows when q covers the posterior.
The log-weights are the *unscaled* ones of :func:`ppl_vae.infer.importance.importance_log_weights` (the same function
that :class:`~ppl_vae.infer.iwae.TraceIWAE` uses), so the result does not depend on the model's ``num_data``.

Memory rule. Data are processed in batches of ``batch_size`` datapoints and, within a batch, in chunks of
``chunk_size`` samples; per-datapoint results are combined across chunks with a running logsumexp, so at most
``chunk_size × batch_size`` datapoint-samples are alive at once. The defaults keep their memory within a byte
budget ``max_bytes`` (:data:`DEFAULT_MAX_BYTES` = 32 MiB): with b bytes per datapoint-sample
(:func:`bytes_per_sample`) and E = max(1, ``max_bytes`` // b) datapoint-samples,
``batch_size = min(N, max(1, E // min(S, E)))`` and ``chunk_size = min(S, max(1, E // batch_size))`` (whichever
you give is kept; the other follows). b is estimated from the data, b = e · (8 · D + 1024) with D =
``x[0].numel()`` and e = max(element size of ``x``, 4) bytes. How it was measured: the growth of the peak RSS
(``ru_maxrss``, fresh process) per datapoint-sample of one no-grad importance pass on CPU was 3.6·D·e
(Bernoulli), 4.8·D·e (Laplace) and 6.7·D·e (Gaussian likelihood) for 28×28 images with 200–256-unit MLPs
(several decoder-output-sized temporaries: the output and the log-density's intermediates), and ≈ 2 KB for 2-D
data with 256-unit hidden layers (the hidden activations: the constant term); 8·D + 1024 covers all of them.
Much wider networks or conv decoders with many channels need a smaller ``max_bytes``. The budget bounds the live
tensors (Burda's 784-200-200-50 MLP, S = 5000: ≈ 10–12 MiB at the default, ≈ 1 GiB with the old rule); glibc's
heap keeps some freed memory resident, so the process's RSS grows by up to ≈ 45 MiB (``bench/iwae_speed.py``).
Small chunks are also faster on CPU, as they stay in cache (the default is 1.3–1.4× faster than the old rule on
one thread). ``max_elements`` (a budget of E directly; the previous default rule was 100 000) is deprecated.

Randomness. The whole computation runs in a forked RNG seeded once with ``seed`` (the caller's torch RNG is
left untouched). The same (seed, batch_size, chunk_size, vectorize_particles) gives bit-identical numbers on the
same device. Another chunking draws other samples: an equally valid estimate that agrees within Monte Carlo
error, not bit-for-bit. Models and guides are switched to ``eval()`` for the call and restored afterwards.
Pyro's validation (site shapes, distribution arguments), when enabled, checks the first pass of every
(chunk, batch) shape; the other passes, which repeat it with new draws, run without it (as training does after
its first step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

import pyro
import torch

from ..infer.importance import fork_rng, guess_max_plate_nesting, importance_log_weights
from ..infer.signature import adapt, on_indices
from ..infer.trace_checks import IWAEError
from ..nn.device import eval_mode
from .defensive import defended

__all__ = [
    "log_likelihood",
    "log_likelihood_summary",
    "bits_per_dim",
    "mc_std_error",
    "plan_chunks",
    "bytes_per_sample",
    "DEFAULT_MAX_BYTES",
]

DEFAULT_MAX_BYTES = 32 * 2**20
_OUTPUT_COPIES = 8  # decoder-output-sized temporaries per datapoint-sample (measured ≤ 6.7; module docstring)
_HIDDEN_ELEMENTS = 1024  # hidden activations per datapoint-sample, independent of the data size


def bytes_per_sample(data: torch.Tensor) -> int:
    """Estimated peak bytes per datapoint-sample of one importance pass: max(e, 4) · (8 · D + 1024) with D the
    elements of one datapoint and e its element size (the measurements are in the module docstring)."""
    D = data[0].numel() if data.dim() > 1 else 1
    return max(int(data.element_size()), 4) * (_OUTPUT_COPIES * int(D) + _HIDDEN_ELEMENTS)


def plan_chunks(
    num_data: int,
    num_samples: int,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    bytes_per_sample: int = 4 * (_OUTPUT_COPIES + _HIDDEN_ELEMENTS),
    max_elements: int | None = None,
) -> tuple[int, int]:
    """(batch_size, chunk_size) following the rule in the module docstring: at most E = max(1, ``max_bytes`` //
    ``bytes_per_sample``) datapoint-samples at once unless ``batch_size`` alone exceeds it. ``max_elements``
    (deprecated) gives E directly and overrides the byte budget."""
    if num_samples < 1 or int(num_samples) != num_samples:
        raise IWAEError(f"num_samples must be a positive integer, got {num_samples!r}")
    for name, v in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if v is not None and (int(v) != v or v < 1):
            raise IWAEError(f"{name} must be a positive integer or None, got {v!r}")
    if max_elements is not None:
        warnings.warn(
            "plan_chunks/log_likelihood(max_elements=...) is deprecated: give a memory budget in bytes, max_bytes=...",
            DeprecationWarning,
            stacklevel=3,
        )
        if max_elements < 1:
            raise IWAEError(f"max_elements must be positive, got {max_elements!r}")
        E = int(max_elements)
    else:
        if not max_bytes > 0:
            raise IWAEError(f"max_bytes must be positive, got {max_bytes!r}")
        if not bytes_per_sample > 0:
            raise IWAEError(f"bytes_per_sample must be positive, got {bytes_per_sample!r}")
        E = max(1, int(max_bytes) // int(bytes_per_sample))
    n, s = max(int(num_data), 1), int(num_samples)
    if batch_size is None and chunk_size is None:
        batch_size = min(n, max(1, E // min(s, E)))
    elif batch_size is None:
        batch_size = min(n, max(1, E // int(chunk_size)))
    batch_size = min(int(batch_size), n)
    if chunk_size is None:
        chunk_size = max(1, E // batch_size)
    return batch_size, min(int(chunk_size), s)


def _check_data(data, y):
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise IWAEError(f"data must be a tensor of shape (N, ...), got {type(data).__name__}")
    if y is not None:
        y = torch.as_tensor(y, device=data.device)
        if y.shape[0] != data.shape[0]:
            raise IWAEError(f"y has {y.shape[0]} labels but data has {data.shape[0]} datapoints")
    return y


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    y=None,
    progress: bool = False,
    *,
    data_plate: str = "data",
    vectorize_particles: bool = True,
    max_plate_nesting: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_elements: int | None = None,
    return_ess: bool = False,
    defensive="auto",
    defensive_weight: float = 0.1,
    defensive_inflation: float = 4.0,
    _sites: list | None = None,
):
    """Per-datapoint importance-sampled log p̂(x_i) in nats, shape (N,), on ``data``'s device.

    ``model``/``guide`` are called as ``model(x_batch)`` or ``model(x_batch, y_batch)`` (e.g. ``vae.model``,
    ``vae.guide``). ``num_samples`` is S. See the module docstring for batching, chunking (``max_bytes``, the
    memory budget of the default chunking; ``max_elements`` is deprecated) and seeding. ``progress=True`` shows a
    progress bar (tqdm, if installed) counting datapoint-samples, updated after every chunk.
    ``return_ess=True`` also returns the importance-sampling effective sample size (Σw)²/Σw² per datapoint,
    from which :func:`mc_std_error` gives the delta-method Monte Carlo standard error of each log p̂(x_i).
    Observed sites outside the data plate are not part of any p(x_i): they are left out, with a warning.
    ``defensive`` (``"auto"``, True, False): guide sites of compact support (``"auto"``; True: every continuous
    latent site) are drawn from the defensive mixture (1 − ``defensive_weight``) q + ``defensive_weight``
    N(mean q, ``defensive_inflation`` · Var q) (:mod:`ppl_vae.evaluate.defensive`), without which the estimate
    of such a guide only integrates over its support; a guide without such sites is unaffected.
    """
    y = _check_data(data, y)
    N, S = data.shape[0], int(num_samples)
    batch_size, chunk_size = plan_chunks(
        N,
        S,
        batch_size,
        chunk_size,
        max_bytes=max_bytes,
        bytes_per_sample=bytes_per_sample(data),
        max_elements=max_elements,
    )
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=N * S, desc="log-likelihood", unit="sample", unit_scale=True)
        except ImportError:  # pragma: no cover
            pass
    try:
        out, ess_out, sites = _log_likelihood_loop(
            model,
            guide,
            data,
            y,
            N,
            S,
            batch_size,
            chunk_size,
            seed,
            data_plate,
            vectorize_particles,
            max_plate_nesting,
            bar,
            (defensive, defensive_weight, defensive_inflation),
        )
    finally:
        if bar is not None:
            bar.close()
    log_px = torch.cat(out) if out else data.new_zeros(0, dtype=torch.float32)
    ess = torch.cat(ess_out) if ess_out else data.new_zeros(0, dtype=torch.float64)
    if _sites is not None:
        _sites.extend(sites)
    return (log_px, ess) if return_ess else log_px


def _log_likelihood_loop(
    model,
    guide,
    data,
    y,
    N,
    S,
    batch_size,
    chunk_size,
    seed,
    data_plate,
    vectorize_particles,
    max_plate_nesting,
    bar,
    defensive,
):
    out, ess_out = [], []
    with eval_mode(model, guide), fork_rng():
        model, guide = adapt(model, "model"), adapt(guide, "guide")  # model(x) or model(x, y)
        guide, shield = defended(guide, *defensive)
        nesting = max_plate_nesting
        if vectorize_particles and chunk_size > 1 and nesting is None and N > 0:
            args0 = (data[:batch_size],) if y is None else (data[:batch_size], y[:batch_size])
            try:
                nesting = guess_max_plate_nesting(model, guide, args0)
            except (IndexError, ValueError, RuntimeError, IWAEError):
                nesting = None  # a model that indexes the whole data set: found out below
        torch.manual_seed(seed)
        run = _Batches(S, chunk_size, data_plate, vectorize_particles, nesting, bar)
        try:
            for start in range(0, N, batch_size):
                xb = data[start : start + batch_size]
                args = (xb,) if y is None else (xb, y[start : start + batch_size])
                lp, ess = run.batch(model, guide, args, xb.shape[0])
                out.append(lp)
                ess_out.append(ess)
        except (IndexError, ValueError, RuntimeError, IWAEError) as e:
            size = full_data_subsample(guide, data, y, data_plate) if not out else None
            if size is None:
                raise
            torch.manual_seed(seed)  # the model indexes the whole data set: give it all, chunk its indices
            if bar is not None:
                bar.reset()
            out, ess_out = _full_data_loop(model, guide, data, y, N, size, run, e)
    return out, ess_out, sorted(shield.sites)


class _Batches:
    """Per-datapoint log p̂ and ESS of one batch, its ``S`` draws in chunks (running logsumexp)."""

    def __init__(self, S, chunk_size, data_plate, vectorize_particles, nesting, bar):
        self.S, self.chunk_size, self.data_plate = S, chunk_size, data_plate
        self.vectorize, self.nesting, self.bar = vectorize_particles, nesting, bar
        self.validated: set = set()
        self.warned = False

    def batch(self, model, guide, args, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        acc = acc2 = None
        done = 0
        out_dtype = torch.float32
        while done < self.S:
            c = min(self.chunk_size, self.S - done)
            shape = (c, n)
            with contextlib.nullcontext() if shape not in self.validated else pyro.validation_enabled(False):
                lw = importance_log_weights(
                    model,
                    guide,
                    args,
                    num_particles=c,
                    vectorize_particles=self.vectorize,
                    max_plate_nesting=self.nesting,
                    data_plate=self.data_plate,
                )
            self.validated.add(shape)
            if lw.batch_size != n:
                raise IWAEError(
                    f"the plate '{self.data_plate}' has {lw.batch_size} datapoints but the batch has "
                    f"{n}: the data plate must run over the batch passed to the model"
                )
            if lw.global_terms and not self.warned:
                warnings.warn(
                    f"log_likelihood: observed sites outside the plate '{self.data_plate}' "
                    f"{sorted(lw.global_terms)} are not part of any per-datapoint p(x_i) and are left "
                    "out",
                    stacklevel=5,
                )
                self.warned = True
            out_dtype = lw.log_w.dtype
            log_w = lw.log_w.double()
            s1, s2 = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
            acc = s1 if acc is None else torch.logaddexp(acc, s1)
            acc2 = s2 if acc2 is None else torch.logaddexp(acc2, s2)
            done += c
            if self.bar is not None:
                self.bar.update(c * n)
        assert acc is not None and acc2 is not None
        return (acc - math.log(self.S)).to(out_dtype), torch.exp(2 * acc - acc2)


def full_data_subsample(guide, data, y, data_plate: str) -> int | None:
    """For a guide whose data plate indexes the whole data set (Pyro's subsampling idiom, ``with
    pyro.plate("data", len(x), subsample_size=B) as idx: ... x[idx]``): its subsample size B; otherwise ``None``."""
    return _probe(guide, data, y, data_plate)[1]


def _probe(guide, data, y, data_plate: str) -> tuple[bool, int | None]:
    """(whether the guide runs on ``data``, :func:`full_data_subsample`'s answer) from one traced run."""
    try:
        with torch.no_grad(), fork_rng(), pyro.poutine.block():
            tr = pyro.poutine.trace(guide).get_trace(*((data,) if y is None else (data, y)))
    except Exception:  # noqa: BLE001  (not a full-data program: the caller re-raises its own error)
        return False, None
    site = tr.nodes.get(data_plate)
    fn = site["fn"] if site is not None and site["type"] == "sample" else None
    if type(fn).__name__ != "_Subsample" or fn.size != len(data) or not (fn.subsample_size or fn.size) < fn.size:
        return True, None
    return True, int(fn.subsample_size)


def datapoint_chunks(guide, x, y, batch_size: int, data_plate: str = "data"):
    """Chunks that cover every datapoint of ``x`` once, as ``(wrap, args, rows, keep)``: run ``wrap(fn)(*args)``
    (the guide, the model), which returns ``rows`` datapoints, and keep the first ``keep`` of them. A program whose
    data plate runs over the batch it is given gets slices of ``batch_size`` rows; a program that indexes the whole
    data set itself (:func:`full_data_subsample`: subsample size B) gets all of ``x`` each time with its plate's indices
    fixed to chunks of B (the last one wraps around)."""
    head, yh = x[:batch_size], None if y is None else y[:batch_size]
    ran, size = _probe(guide, head, yh, data_plate)
    if not ran and len(x) > len(head):  # a batch smaller than its B
        size = full_data_subsample(guide, x, y, data_plate)
    if size is None:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            yield (lambda fn: fn), ((xb,) if y is None else (xb, y[s : s + batch_size])), len(xb), len(xb)
        return
    for s in range(0, len(x), size):
        idx = torch.arange(s, s + size, device=x.device) % len(x)
        wrap = functools.partial(on_indices, plate=data_plate, indices=idx)
        yield wrap, ((x,) if y is None else (x, y)), size, min(size, len(x) - s)


def full_data_log_weights(model, guide, x, y, size: int, data_plate: str = "data", **kwargs):
    """:func:`~ppl_vae.infer.importance.importance_log_weights` of every datapoint of ``x`` for a program that
    indexes the whole data set (subsample size ``size``, :func:`full_data_subsample`): chunks of ``size`` indices,
    put back together along the datapoint dimension."""
    args = (x,) if y is None else (x, y)
    N = len(x)
    parts = []
    for start in range(0, N, size):
        idx = torch.arange(start, start + size, device=x.device) % N
        fixed = on_indices(model, data_plate, idx), on_indices(guide, data_plate, idx)
        lw = importance_log_weights(*fixed, args, data_plate=data_plate, **kwargs)
        parts.append((lw, min(size, N - start)))
    first = parts[0][0]

    def cat(get, dim):
        return {k: torch.cat([get(lw)[k].narrow(dim, 0, keep) for lw, keep in parts], dim) for k in get(first)}

    return dataclasses.replace(
        first,
        log_w=torch.cat([lw.log_w[:, :keep] for lw, keep in parts], 1),
        model_terms=cat(lambda lw: lw.model_terms, 1),
        guide_terms=cat(lambda lw: lw.guide_terms, 1),
        values=cat(lambda lw: lw.values, 1),
        observed=cat(lambda lw: lw.observed, 0),
    )


def _full_data_loop(model, guide, data, y, N, size, run: _Batches, first_error):
    """Chunks of ``size`` indices of the data plate (the last one wrapped around and cut), the program given the
    whole data set each time."""
    out, ess_out = [], []
    args = (data,) if y is None else (data, y)
    for start in range(0, N, size):
        idx = torch.arange(start, start + size, device=data.device) % N
        keep = min(size, N - start)
        try:
            lp, ess = run.batch(
                on_indices(model, run.data_plate, idx), on_indices(guide, run.data_plate, idx), args, size
            )
        except (IndexError, ValueError, RuntimeError, IWAEError):
            raise first_error from None
        out.append(lp[:keep])
        ess_out.append(ess[:keep])
    return out, ess_out


def mc_std_error(ess: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Delta-method Monte Carlo std error of log p̂ = log mean_k w_k: sqrt(1/ESS − 1/S).

    Var(mean w)/mean(w)² ≈ (Σw²/S − (Σw/S)²)/(S (Σw/S)²) = 1/ESS − 1/S, with ESS = (Σw)²/Σw². Reliable only
    when the weights have a finite variance (PSIS k̂ < 0.5); an underestimate otherwise.
    """
    ess = torch.as_tensor(ess, dtype=torch.float64)
    return (1.0 / ess - 1.0 / num_samples).clamp(min=0.0).sqrt()


def bits_per_dim(log_px_nats, data_dim):
    """−log p(x) / (D ln 2): nats per datapoint → bits per dimension (``data_dim`` = D, an int or a shape).

    For discrete data (binarised images) this is the usual bits/dim. For continuous densities of dequantised
    8-bit data, convert the density to a probability of the 256-level bins first.
    """
    D = math.prod(data_dim) if isinstance(data_dim, (tuple, list, torch.Size)) else int(data_dim)
    if D < 1:
        raise IWAEError(f"data_dim must be positive, got {data_dim!r}")
    return -log_px_nats / (D * math.log(2.0))


def log_likelihood_summary(
    model: Callable, guide: Callable, data: torch.Tensor, num_samples: int = 5000, **kwargs
) -> dict:
    """Mean log p̂(x) over the data with its standard errors, as a dict of floats.

    Keys: ``log_likelihood`` (mean nats per datapoint), ``std_error`` (std over datapoints / √N: the sampling
    error of the data set), ``mc_std_error`` (Monte Carlo error of the mean, delta method, √(Σ_i se_i²)/N),
    ``bits_per_dim`` and ``bits_per_dim_std_error`` (D = data.shape[1:]), ``min_ess``, ``mean_ess``,
    ``num_data``, ``num_samples``, ``defensive_sites`` (the guide sites drawn from a defensive mixture).
    ``kwargs`` go to :func:`log_likelihood`.
    """
    kwargs.pop("return_ess", None)
    sites: list = []
    log_px, ess = log_likelihood(model, guide, data, num_samples, return_ess=True, _sites=sites, **kwargs)
    lp = log_px.double().cpu()
    N = lp.numel()
    D = math.prod(data.shape[1:]) if data.dim() > 1 else 1
    mean = lp.mean().item() if N else float("nan")
    se = (lp.std(unbiased=True) / math.sqrt(N)).item() if N > 1 else float("nan")
    mc = (mc_std_error(ess.cpu(), num_samples).pow(2).sum().sqrt() / N).item() if N else float("nan")
    return {
        "log_likelihood": mean,
        "std_error": se,
        "mc_std_error": mc,
        "bits_per_dim": float(bits_per_dim(mean, D)),
        "bits_per_dim_std_error": se / (D * math.log(2.0)),
        "min_ess": ess.min().item() if N else float("nan"),
        "mean_ess": ess.double().mean().item() if N else float("nan"),
        "num_data": N,
        "num_samples": int(num_samples),
        "defensive_sites": sites,
    }
