"""The jitted step of every program, with abstract arguments: what one step of each costs in memory.

For a model's configs (:class:`~qlip_jax.models.sd.SDConfigs`: a preset or a diffusers folder's
``config.json`` files) :func:`program_steps` builds, without materialising a single weight (every
param, quantizer state and data tree is a ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``), the
function each program jits and the abstract arguments it is called with:

==================  =======================================================================================
``sampling``        ``Text2Image``'s loop, quantized under a schedule (evaluation), ``sample_batch`` prompts
``calibration``     ``Text2Image.trajectory`` (float) of ``calib_prompts`` prompts (``train/calibrate.py``)
``reconstruction``  one Q-Diffusion step (``make_recon_step``), ``recon_batch`` samples x K candidates
``t2q-labels``      ``Text2Image.trajectory`` of ``label_batch`` prompts (``train/train_selector.py``)
``q2b``             one Q2B step (``make_q2b_step``), ``q2b_batch x rows_per_prompt`` rows, fp + quantized
``pretraining``     one UNet + text encoder step (``make_diffusion_step``), ``pretrain_batch`` latents
==================  =======================================================================================

``jax.jit(fn).lower(*args).compile().memory_analysis()`` is then XLA's own account of the step
(``benchmarks/memory.py``); ``--memory-budget`` compiles the same steps at each micro-batch
(:func:`qlip_jax.memory.choose_micro_batch`). Params, quantizer state and data are arguments of every
step, never constants (``tests/test_memory.py`` checks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from qlip_jax.models.clip import CLIPTextModel, abstract_text_params
from qlip_jax.models.sd import SDConfigs, StableDiffusion
from qlip_jax.models.configs import UNetConfig
from qlip_jax.models.unet import (REMAT_CHANNELS, UNet2DConditionModel, abstract_unet_params, default_remat,
                                  unet_registry)
from qlip_jax.models.vae import abstract_vae_params
from qlip_jax.naming import modules_by_name
from qlip_jax.quant.codes import CODE_KEY
from qlip_jax.ptq.reconstruction import ReconOptions, abstract_variables, make_recon_step, recon_optimizer
from qlip_jax.quant.registry import concat_splits, init_quant_state
from qlip_jax.quant.state import QuantConfig, QuantSetup
from qlip_jax.sampling.pipeline import Text2Image
from qlip_jax.selector.q2b import Q2B, Q2BConfig, bit_penalty, ste_onehot
from qlip_jax.selector.training import make_q2b_loss, make_q2b_step
from qlip_jax.training.diffusion import make_diffusion_step

S = jax.ShapeDtypeStruct
PROGRAMS = ("sampling", "calibration", "reconstruction", "t2q-labels", "q2b", "pretraining")

#: Default micro-batch (rows at a time) of the programs that differentiate through an SD-size UNet (at
#: least :data:`~qlip_jax.models.unet.REMAT_CHANNELS` channels, as remat): reconstruction samples (x K
#: candidates), Q2B rows, pretraining latents. Measured with ``benchmarks/memory.py`` on SD v1.4 at 512x512
#: in bfloat16 (docs/memory.md): Q2B fits 30 GiB at 1 row (not at 2), pretraining at 1 latent (not at 2);
#: reconstruction needs more than 30 GiB even at 1 sample, its smallest. Smaller UNets (the embedded model,
#: the presets) run the whole batch.
SD_MICRO_BATCH = {"reconstruction": 1, "q2b": 1, "pretraining": 1}


def default_micro_batch(program: str, unet_config: UNetConfig, rows: int) -> int:
    """The micro-batch ``program`` uses unless told otherwise: for UNets with at least
    :data:`~qlip_jax.models.unet.REMAT_CHANNELS` channels the largest divisor of ``rows`` not above
    :data:`SD_MICRO_BATCH`'s entry, else (and for programs without an entry) 0: the whole batch."""
    cap = SD_MICRO_BATCH.get(program)
    if cap is None or max(unet_config.block_out_channels) < REMAT_CHANNELS or rows <= cap:
        return 0
    return max(d for d in range(1, cap + 1) if rows % d == 0)


@dataclasses.dataclass(frozen=True)
class ProgramSettings:
    """The programs' default sizes (their command-line defaults) and the memory options.

    ``size``: image side in pixels (None: the model's native ``sample_size x VAE factor``).
    ``micro_batch``: ``{program: rows per micro-batch}`` (absent: :func:`default_micro_batch`, see
    :meth:`micro_for`; :func:`program_steps` itself builds exactly what is given).
    ``attention_chunk``, ``remat``: the UNet's memory options (None: the model's defaults,
    :func:`~qlip_jax.models.unet.default_attention_chunk`, :func:`~qlip_jax.models.unet.default_remat`).
    """

    size: int | None = None
    steps: int = 25
    act_bits: tuple[int, ...] = (6, 8, 10)
    weight_bits: int = 4
    sample_batch: int = 8
    calib_prompts: int = 32
    recon_batch: int = 8
    label_batch: int = 32
    q2b_batch: int = 8
    rows_per_prompt: int = 4
    pretrain_batch: int = 64
    dtype: str = "float32"
    micro_batch: tuple[tuple[str, int], ...] = ()
    attention_chunk: int | None = None
    remat: str | None = None

    def micro(self, program: str) -> int | None:
        return dict(self.micro_batch).get(program)

    def micro_for(self, program: str, unet_config: UNetConfig) -> int:
        """The micro-batch ``program`` runs at: the one given, else :func:`default_micro_batch`, else the
        whole batch (:func:`rows_of`)."""
        rows = rows_of(program, self)
        return self.micro(program) or default_micro_batch(program, unet_config, rows) or rows

    def with_micro(self, program: str, micro_batch: int | None) -> "ProgramSettings":
        d = {k: v for k, v in self.micro_batch if k != program}
        if micro_batch:
            d[program] = micro_batch
        return dataclasses.replace(self, micro_batch=tuple(sorted(d.items())))


def rows_of(program: str, s: ProgramSettings) -> int:
    """The batch a program's micro-batch divides (prompts, samples or rows)."""
    return {"sampling": s.sample_batch, "calibration": s.calib_prompts, "reconstruction": s.recon_batch,
            "t2q-labels": s.label_batch, "q2b": s.q2b_batch * s.rows_per_prompt,
            "pretraining": s.pretrain_batch}[program]


def abstract_sd(configs: SDConfigs) -> StableDiffusion:
    """A :class:`StableDiffusion` whose params are ``ShapeDtypeStruct`` trees (nothing allocated)."""
    params = {"unet": abstract_unet_params(configs.unet, configs.text.hidden_size),
              "vae": abstract_vae_params(configs.vae), "text_encoder": abstract_text_params(configs.text)}
    return StableDiffusion(configs, params, tokenizer=None)


def _abstract_quant(pipe: Text2Image, sd: StableDiffusion, config: QuantConfig) -> QuantSetup:
    ctx = (sd.configs.text.max_position_embeddings, sd.configs.text.hidden_size)
    lat = pipe.latent_shape
    registry = unet_registry(sd.configs.unet, lat[:2], ctx, config.quantize_attn_matmul)
    splits = concat_splits(UNet2DConditionModel(sd.configs.unet), S((1, *lat), jnp.float32), S((1,), jnp.int32),
                           S((1, *ctx), jnp.float32))
    state = jax.eval_shape(lambda p: init_quant_state(p, registry, config, None, splits), sd.params["unet"])
    if config.weight_bits <= 8:  # calibrated states carry int8 weight codes (qlip_jax.quant.codes)
        layers = modules_by_name(sd.params["unet"])
        state = {name: ({**st, CODE_KEY: S(layers[name]["kernel"].shape, jnp.int8)} if "w_scale" in st else st)
                 for name, st in state.items()}
    return QuantSetup(config, registry, state)


def program_steps(configs: SDConfigs, settings: ProgramSettings = ProgramSettings(),
                  programs: tuple[str, ...] = PROGRAMS) -> dict[str, tuple[Callable, tuple]]:
    """``{program: (jitted step, abstract args)}``; ``jax.jit``'s ``lower(*args)`` compiles one step.

    Only the programs named in ``programs`` are built.
    """
    s = settings
    dtype = jnp.dtype(s.dtype)
    sd = abstract_sd(configs)
    m, d = configs.text.max_position_embeddings, configs.text.hidden_size
    quant_cfg = QuantConfig(act_bits=s.act_bits, weight_bits=s.weight_bits)
    fp_pipe = Text2Image(sd, "ddim", s.steps, s.size, s.size, dtype=dtype, attention_chunk=s.attention_chunk)
    quant = _abstract_quant(fp_pipe, sd, quant_cfg)
    q_pipe = Text2Image(sd, "ddim", s.steps, s.size, s.size, quant=quant, dtype=dtype,
                        attention_chunk=s.attention_chunk)
    remat = default_remat(configs.unet) if s.remat is None else s.remat
    lat = fp_pipe.latent_shape
    T, L = q_pipe.num_steps, len(quant.registry)
    f32, i32 = jnp.float32, jnp.int32
    unet_params = sd.params["unet"]
    out = {}

    def sampler_args(pipe, b, schedule):
        return (pipe._params(), S((b, m, d), f32), S((b, m, d), f32), S((b,), jnp.uint32),
                S((b, T, L), i32) if schedule else None, None, S((T,), f32))

    if "sampling" in programs:
        out["sampling"] = (q_pipe._sample, sampler_args(q_pipe, s.sample_batch, True))
    if "calibration" in programs:
        b = s.micro("calibration") or s.calib_prompts
        out["calibration"] = (jax.jit(lambda *a: fp_pipe._sample(*a, keep_trajectory=True)),
                              sampler_args(fp_pipe, b, False))
    if "t2q-labels" in programs:
        b = s.micro("t2q-labels") or s.label_batch
        out["t2q-labels"] = (jax.jit(lambda *a: fp_pipe._sample(*a, keep_trajectory=True)),
                             sampler_args(fp_pipe, b, False))
    if "reconstruction" in programs:
        opts = ReconOptions(batch=s.recon_batch, micro_batch=s.micro("reconstruction") or 0, remat=remat)
        var = abstract_variables(quant.state, unet_params, quant.registry, quant_cfg, opts)
        tx = recon_optimizer(var, opts)
        step = make_recon_step(fp_pipe.unet, quant_cfg, quant.registry.names, opts, tx)
        b = s.recon_batch
        out["reconstruction"] = (step, (var, jax.eval_shape(tx.init, var), unet_params, quant.state, S((), f32),
                                        S((b, *lat), f32), S((b,), i32), S((b, m, d), f32), None))
    if "q2b" in programs:
        q2b_cfg = Q2BConfig(num_layers=L, num_steps=T)
        q2b = Q2B(q2b_cfg)
        params = jax.eval_shape(lambda: q2b.init(jax.random.key(0), jnp.zeros((1,)), T)["params"])
        probs_fn = lambda p, q: q2b.apply({"params": p}, q, T)  # noqa: E731
        penalty_fn = lambda probs: bit_penalty(probs, 1.0, s.act_bits[1] / s.act_bits[2]) / (T * L)  # noqa: E731
        loss = make_q2b_loss(q_pipe.unet.clone(remat=remat), quant, probs_fn, ste_onehot, penalty_fn, 0, 1, 2)
        tx = optax.adam(5e-2)
        r = s.q2b_batch * s.rows_per_prompt
        batch = {"q": S((r,), f32), "step": S((r,), i32), "t": S((r,), i32), "x_fp": S((r, *lat), f32),
                 "x_hat": S((r, *lat), f32), "cond": S((r, m, d), f32), "uncond": S((r, m, d), f32),
                 "guidance": S((r,), f32)}
        frozen = {"unet": unet_params, "quant": quant.state, "ptqd": None, "lambda_bit": S((), f32)}
        out["q2b"] = (make_q2b_step(loss, tx, s.micro("q2b")),
                      (params, jax.eval_shape(tx.init, params), frozen, batch))
    if "pretraining" in programs:
        unet = fp_pipe.unet.clone(remat=remat)
        text = CLIPTextModel(configs.text)
        trainable = {"unet": unet_params, "text_encoder": sd.params["text_encoder"]}
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))
        ac = jnp.asarray(configs.scheduler.alphas_cumprod(), f32)
        step = make_diffusion_step(unet, text, tx, ac, 0.999, micro_batch=s.micro("pretraining"))
        state = {"params": trainable, "opt": jax.eval_shape(tx.init, trainable), "ema": trainable,
                 "step": S((), i32)}
        b = s.pretrain_batch
        out["pretraining"] = (step, (state, S((b, *lat), f32), S((b, m), i32),
                                     jax.eval_shape(lambda: jax.random.key(0))))
    return out


# ----------------------------------------------------------------------------------------------
# Command-line options shared by the programs


def add_memory_arguments(parser, micro_help: str) -> None:
    """``--dtype``, ``--micro-batch``, ``--memory-budget``, ``--attention-chunk``, ``--remat``."""
    g = parser.add_argument_group("memory")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the UNet (params, optimizer state and scheduler stay float32)")
    g.add_argument("--micro-batch", type=int, default=0, metavar="N",
                   help=micro_help + " (0: the default, the whole batch except for SD-size UNets, whose "
                        "reconstruction, Q2B and pretraining steps run in micro-batches; N >= the batch: whole)")
    g.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                   help="pick the largest micro-batch whose compiled step fits (XLA memory analysis); "
                        "overrides --micro-batch")
    g.add_argument("--attention-chunk", type=int, default=None, metavar="N",
                   help="attention query chunk (0: full; default: 1024 above 1024 latent tokens)")
    g.add_argument("--remat", default=None, metavar="POLICY",
                   help="remat policy of differentiated UNet passes ('' off; default: on for SD-size UNets)")


def settings_from_args(args, **sizes) -> ProgramSettings:
    """:class:`ProgramSettings` of a program's parsed arguments (``sizes``: its batch fields)."""
    return ProgramSettings(dtype=args.dtype, attention_chunk=args.attention_chunk, remat=args.remat, **sizes)


def micro_batch_for(args, configs: SDConfigs, program: str, settings: ProgramSettings, log=print) -> int:
    """The micro-batch of ``program``: with ``--memory-budget`` the largest divisor of its batch whose
    compiled step (abstract params) fits, printed with its peak; else ``--micro-batch``; else
    :func:`default_micro_batch` of the model (printed when it splits the batch); else the whole batch."""
    from qlip_jax.memory import GIB, check_micro_batch, choose_micro_batch

    rows = rows_of(program, settings)
    if args.memory_budget is None:
        if args.micro_batch:
            check_micro_batch(rows, args.micro_batch, f"{program} batch")
            return min(args.micro_batch, rows)
        mb = default_micro_batch(program, configs.unet, rows)
        if mb:
            log(f"[memory] {program}: micro-batch {mb} of {rows} (default for UNets with >= {REMAT_CHANNELS} "
                "channels; --micro-batch or --memory-budget to change)")
        return mb or rows

    def compile_at(mb):
        fn, fargs = program_steps(configs, settings.with_micro(program, mb), (program,))[program]
        return fn.lower(*fargs).compile()

    mb, peak = choose_micro_batch(compile_at, rows, args.memory_budget)
    log(f"[memory] {program}: micro-batch {mb} of {rows} (peak {peak / GIB:.2f} GiB <= budget "
        f"{args.memory_budget} GiB)")
    return mb
