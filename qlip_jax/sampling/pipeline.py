"""Text-to-image sampling as one jitted function that consumes a per-prompt precision schedule.

``prompts -> CLIPTokenizer (77 tokens) -> text encoder -> [lax.scan over T steps: UNet on the
unconditional and conditional halves in one call, classifier-free guidance, scheduler step] ->
VAE decode -> uint8 images``.

What is traced and what is static
---------------------------------
:class:`Text2Image` compiles its sampling function once per batch size. Everything that changes
between calls is a traced argument: params, quantizer state, text embeddings, the schedule
``[B, T, L]`` of candidate indices, the guidance scales ``[T]`` (one per step) and the per-prompt
seeds. A new prompt, schedule, guidance scale or seed never recompiles. Static: model configs,
scheduler kind, step count, image size, quantizer config.

``T`` is the length of the scheduler's actual timestep array (PNDM in PLMS mode evaluates the model
once more than the requested step count), and a schedule must have exactly ``T`` steps.

A quantizer with a PTQD correction (``quant.ptqd``, :mod:`qlip_jax.ptq.ptqd`) has its guided
noise prediction corrected per prompt and step under a schedule (and, for DDIM with ``eta > 0``, its
fresh-noise std reduced); the correction's tables are traced inputs too.

Only the UNet is quantized. The text encoder and the VAE run in float (the QLIP setting: the selector
reads the float text embedding, and BitOPs count the UNet).

Randomness: prompt ``b`` draws its initial latents (and DDIM's eta noise) from ``seeds[b]`` alone, so
its image does not depend on the *content* of the rest of the batch.

Batch invariance (``batch_invariant=True``). By default a prompt's image still depends on the batch
*size*: XLA compiles a different program for each batch size (other blocking of convolutions and
matmuls), so float results differ by ~1e-6 between sizes, and under quantization such differences cross
rounding boundaries and grow over the steps (up to tens of uint8 levels). With ``batch_invariant=True``
the sampler runs the compiled batch-1 program once per prompt (and :meth:`Text2Image.encode` encodes
each prompt alone with the empty prompt): every prompt goes through the same executable whatever the
batch size and companions, so its image is bit-identical to sampling it alone, and one compilation
serves every batch size. (A ``while_loop`` over rows inside one jitted call gives the same images but
compiles once per batch size.)
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qlip_jax import distributed
from qlip_jax.errors import SEED_MAX, BadArgument
from qlip_jax.models.clip import CLIPTextModel
from qlip_jax.models.sd import StableDiffusion
from qlip_jax.models.unet import UNet2DConditionModel, default_attention_chunk
from qlip_jax.models.vae import AutoencoderKL, unscale_latents
from qlip_jax.sampling import correction
from qlip_jax.quant.codes import add_weight_codes, has_codes
from qlip_jax.quant.state import QuantArgs, QuantSetup, check_indices, prepare_rows
from qlip_jax.sampling import schedulers
from qlip_jax.sampling.guidance import guided_output


@dataclasses.dataclass
class TextEmbeddings:
    """Encoded prompts: ``cond [B, M, D]``, ``pooled [B, D]``, ``uncond [1, M, D]`` (empty prompt)."""

    cond: jax.Array
    pooled: jax.Array
    uncond: jax.Array
    truncated: list[bool]


def add_int8_argument(parser) -> None:
    """``--int8`` on a program's argument parser (``Text2Image(int8=...)``)."""
    parser.add_argument("--int8", action="store_true",
                        help="quantized layers at <= 8 activation bits run real int8 x int8 products with int32 "
                             "accumulation (same images up to float rounding; off by default: not faster on CPU)")


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]``."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)



def seed_array(seeds, batch: int) -> np.ndarray:
    """uint32 ``[batch]`` seeds from one int or ``[batch]`` ints; a seed outside ``[0, 2**32 - 1]`` raises
    :class:`~qlip_jax.errors.BadArgument` instead of silently wrapping onto another seed."""
    arr = np.asarray(seeds)
    if not np.issubdtype(arr.dtype, np.integer):
        raise BadArgument(f"seeds must be integers, got dtype {arr.dtype}", "pass int seeds")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > SEED_MAX):
        raise BadArgument(f"seed out of range: {int(arr.min())}..{int(arr.max())}",
                          f"seeds are unsigned 32-bit, 0..{SEED_MAX}; a negative or larger one would wrap")
    return np.broadcast_to(arr.astype(np.uint32), (batch,))

class Text2Image:
    """A Stable Diffusion sampler with a fixed scheduler, step count and image size.

    Args:
      sd: the loaded model (params, configs, tokenizer).
      scheduler: ``"ddim"``, ``"pndm"`` (PLMS) or ``"dpmsolver++"``.
      steps: requested inference steps; :attr:`num_steps` is the actual ``T``.
      height, width: image size (default: UNet ``sample_size`` x VAE factor).
      quant: quantizer for schedule-driven sampling (None: float only).
      eta: DDIM eta (0: deterministic DDIM).
      mesh: optional mesh of :mod:`qlip_jax.distributed` (axes ``data``, ``fsdp``, over one or many
        processes): the batch is split over both axes, the UNet's params over ``fsdp``; images and
        trajectories come back whole on every process.
      dtype: compute dtype of the UNet (e.g. ``jnp.bfloat16`` on TPU); params stay float32, and the
        scheduler arithmetic, text encoder and VAE run in float32.
      guidance_rescale: ``phi`` in ``[0, 1]`` of :func:`qlip_jax.sampling.guidance.combine` (0: plain
        classifier-free guidance; Lin et al. suggest 0.7 for zero-terminal-SNR models).
      batch_invariant: sample (and encode) one prompt at a time so that a prompt's image is
        bit-identical whatever the batch size and companions (see the module docstring); slower where
        batching helps. Not combined with ``mesh``.
      attention_chunk: query chunk of the UNet's attention (0: full; None: chunks of 1024 above 1024
        latent tokens, :func:`~qlip_jax.models.unet.default_attention_chunk`); equal to float rounding.
      int8: run the quantized conv/linear layers of candidates with at most 8 activation bits as real
        int8 x int8 products with int32 accumulation (``QuantArgs.int8``); same images up to float
        rounding of the rescale. Off by default (not measured faster on CPU).
    """

    #: Quantized sampling computes every layer's per-row quantizer parameters for every step before its
    #: loop (``quant.state.prepare_rows``) and hands them to the layers: the same images, a program
    #: XLA compiles much faster; False (set before the first call) makes each layer look its rows up
    #: itself at each step.
    prepare_rows: bool = True

    def __init__(self, sd: StableDiffusion, scheduler: str = "ddim", steps: int = 25,
                 height: int | None = None, width: int | None = None, quant: QuantSetup | None = None,
                 eta: float = 0.0, mesh: Mesh | None = None, dtype=jnp.float32, guidance_rescale: float = 0.0,
                 batch_invariant: bool = False, attention_chunk: int | None = None,
                 int8: bool = False):
        self.sd, self.quant, self.mesh = sd, quant, mesh
        if batch_invariant and mesh is not None:
            raise ValueError("batch_invariant=True runs prompts one at a time and cannot shard the batch over "
                             "a mesh; pass either mesh= or batch_invariant=True")
        self.batch_invariant, self.int8 = bool(batch_invariant), bool(int8)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.guidance_rescale = float(guidance_rescale)
        cfg = sd.configs
        self.sched = schedulers.make_scheduler(scheduler, cfg.scheduler, steps, eta=eta)
        self.num_steps = int(self.sched.timesteps.shape[0])
        factor = cfg.vae.downsampling_factor
        height = height or cfg.unet.sample_size * factor
        width = width or cfg.unet.sample_size * factor
        multiple = factor * cfg.unet.downsampling_factor  # the UNet halves the latent side (levels - 1) times
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} is not compatible with the model's "
                             f"downsampling factors: both sides must be multiples of {multiple}")
        self.latent_shape = (height // factor, width // factor, cfg.unet.in_channels)
        if attention_chunk is None:
            attention_chunk = default_attention_chunk(self.latent_shape[:2])
        # the VAE decodes images one at a time where the UNet's attention is chunked (SD at 512x512:
        # ~0.9 GiB of decoder activations per image); the embedded model decodes the batch at once
        self.decode_one_by_one = attention_chunk > 0
        self.unet = UNet2DConditionModel(cfg.unet, dtype=dtype, attention_chunk=attention_chunk)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = CLIPTextModel(cfg.text)
        if quant is not None and quant.config.weight_bits <= 8 and not has_codes(quant.state):
            # a hand-made state: give it its integer weight codes once, so no kernel is rounded at run time
            quant = dataclasses.replace(quant, state=add_weight_codes(quant.state, sd.params["unet"],
                                                                      quant.config.weight_bits)[0])
            self.quant = quant
        self._ptqd = quant is not None and quant.ptqd is not None
        if self._ptqd:
            correction.check_sampler(quant.ptqd, self.sched)
            self._mac_share = correction.mac_shares(quant.registry)
        self._traces = [0]  # times the sampling function was traced (tests); shared by with_params copies
        self._encode = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))
        self._sample = jax.jit(self._sample_impl, static_argnames="keep_trajectory")

    @property
    def trace_count(self) -> int:
        """How many times the jitted sampling function has been traced (compiled), over this sampler
        and every :meth:`with_params` copy of it."""
        return self._traces[0]

    def with_params(self, params: dict) -> "Text2Image":
        """This sampler with other weights ``{'unet', 'vae', 'text_encoder'}`` of the same shapes, e.g.
        a training run's EMA weights at each sample grid. The copy shares the jitted encoder and sampling
        loop (params are their arguments), so it reuses what they compiled; ``self`` is unchanged."""
        new = copy.copy(self)
        new.sd = dataclasses.replace(self.sd, params=params)
        return new

    # ------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Tokenize (pad/truncate to the context length) and encode prompts, in float (batch-invariant
        sampler: each prompt in its own ``[prompt, ""]`` call, so its embedding ignores the batch)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        length = self.sd.configs.text.max_position_embeddings
        tok = self.sd.tokenizer
        ids = tok(list(prompts) + [""], padding="max_length", max_length=length, truncation=True,
                  return_tensors="np")["input_ids"]
        truncated = [len(x) > length for x in tok(list(prompts), truncation=False)["input_ids"]]
        params = self.sd.params["text_encoder"]
        if self.batch_invariant:
            parts = [self._encode(params, jnp.asarray(ids[[i, -1]])) for i in range(len(prompts))]
            hidden = jnp.concatenate([h[:1] for h, _ in parts] + [parts[0][0][1:]])
            pooled = jnp.concatenate([p[:1] for _, p in parts] + [parts[0][1][1:]])
        else:
            hidden, pooled = self._encode(params, jnp.asarray(ids))
        return TextEmbeddings(hidden[:-1], pooled[:-1], hidden[-1:], truncated)

    def guidance_scales(self, guidance) -> jax.Array:
        """``float32 [T]``: one classifier-free guidance scale per step, from one scale for every step
        or from ``T`` of them. Raises ValueError on a non-finite scale or a wrong length."""
        g = np.asarray(guidance, np.float64)
        if g.ndim == 0:
            g = np.full(self.num_steps, float(g))
        if g.shape != (self.num_steps,):
            raise ValueError(f"guidance must be one scale or one per step ({self.num_steps}), "
                             f"got shape {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"guidance scales must be finite, got {guidance}")
        return jnp.asarray(g, jnp.float32)

    def guidance_interval(self, scale: float, max_timestep: int) -> np.ndarray:
        """``[T]`` scales: ``scale`` at the steps whose timestep is at most ``max_timestep``, 1 (the
        conditional prediction alone) at the noisier ones before them.

        Guidance in a limited interval (Kynkaenniemi et al., NeurIPS 2024): at high noise, guidance
        pushes the layout away from what the unconditional model would draw (here: towards fewer
        objects for one-object prompts), while at lower noise it sharpens what the caption states.
        """
        if max_timestep < 0:
            raise ValueError(f"max_timestep must be >= 0, got {max_timestep}")
        t = np.asarray(self.sched.timesteps)
        return np.where(t <= max_timestep, float(scale), 1.0)

    def uniform_schedule(self, batch: int, act_bits: int | str) -> np.ndarray:
        """``[B, T, L]`` schedule with every layer and step at one candidate (e.g. 8 or ``"fp"``)."""
        if self.quant is None:
            raise ValueError("this sampler has no quantizer; build it with quant=QuantSetup(...)")
        idx = self.quant.config.index_of(act_bits)
        return np.full((batch, self.num_steps, len(self.quant.registry)), idx, np.int32)

    def check_schedule(self, schedule, batch: int) -> None:
        """Raise a clear error if ``schedule`` is not a valid ``[B, T, L]`` candidate-index array."""
        if self.quant is None:
            raise ValueError("a precision schedule needs a quantizer (quant=QuantSetup(...))")
        want = (batch, self.num_steps, len(self.quant.registry))
        if tuple(np.shape(schedule)) != want:
            raise ValueError(f"schedule has shape {tuple(np.shape(schedule))}, expected [B, T, L] = "
                             f"{want} (T is the scheduler's actual number of steps)")
        check_indices(np.asarray(schedule), self.quant.config)

    # ------------------------------------------------------------------------------------------
    def __call__(self, emb: TextEmbeddings, seeds, guidance: float | np.ndarray = 7.5,
                 schedule: np.ndarray | None = None, latents: np.ndarray | None = None) -> np.ndarray:
        """Sample images ``uint8 [B, H, W, 3]``.

        Args:
          emb: from :meth:`encode`.
          seeds: int ``[B]`` (or one int for every prompt), one PRNG seed per prompt.
          guidance: classifier-free guidance scale, one for every step or ``[T]`` (one per step; see
            :meth:`guidance_interval`); 1 disables guidance's effect, not its cost.
          schedule: int ``[B, T, L]`` candidate indices, or None for the float UNet.
          latents: optional initial noise ``[B, h, w, c]`` instead of drawing it from the seeds.
        """
        b = emb.cond.shape[0]
        seeds = seed_array(seeds, b)
        guidance = self.guidance_scales(guidance)
        if schedule is not None:
            self.check_schedule(schedule, b)
            schedule = jnp.asarray(schedule, jnp.int32)
        if latents is not None and tuple(np.shape(latents)) != (b, *self.latent_shape):
            raise ValueError(f"latents must have shape {(b, *self.latent_shape)}, got {np.shape(latents)}")
        args = [emb.cond, jnp.broadcast_to(emb.uncond, emb.cond.shape), jnp.asarray(seeds),
                schedule, None if latents is None else jnp.asarray(latents, jnp.float32)]
        images, _ = self._run(self._place(args), guidance)
        return images[:b]

    def _place(self, args: list) -> list:
        """Batch arrays ``[B, ...]`` (or None) as the jitted loop takes them: with a mesh, padded to a
        multiple of its batch shards (the last row repeated) and split over them."""
        return args if self.mesh is None else distributed.put_rows(args, self.mesh)

    def trajectory(self, emb: TextEmbeddings, seeds, guidance: float | np.ndarray = 7.5,
                   schedule: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`__call__`, also returning the UNet's latent input at every step.

        Returns ``(images uint8 [B, H, W, 3], latents [T, B, h, w, c])``; step ``i`` ran the UNet on
        ``latents[i]`` at ``timesteps[i]`` (calibration data, selector training).
        """
        b = emb.cond.shape[0]
        seeds = seed_array(seeds, b)
        if schedule is not None:
            self.check_schedule(schedule, b)
        args = [emb.cond, jnp.broadcast_to(emb.uncond, emb.cond.shape), jnp.asarray(seeds),
                None if schedule is None else jnp.asarray(schedule), None]
        images, traj = self._run(self._place(args), self.guidance_scales(guidance), keep_trajectory=True)
        return images[:b], traj[:, :b]

    def generate(self, prompts: list[str], seed: int = 0, guidance: float | np.ndarray = 7.5,
                 schedule: np.ndarray | None = None) -> np.ndarray:
        """Encode and sample; prompt ``i`` uses seed ``seed + i``."""
        emb = self.encode(prompts)
        return self(emb, np.arange(len(prompts)) + seed, guidance, schedule)

    # ------------------------------------------------------------------------------------------
    def _params(self):
        p = {"unet": self.sd.params["unet"], "vae": self.sd.params["vae"],
             "quant": None if self.quant is None else self.quant.state,
             "ptqd": self.quant.ptqd if self._ptqd else None}
        if self.mesh is not None:  # the UNet split on fsdp (if the mesh has it), the rest replicated
            unet = p.pop("unet")
            p = distributed.put(p, distributed.replicated(self.mesh))
            p["unet"] = distributed.put_params(unet, self.mesh)
        return p

    def _run(self, args: list, guidance: jax.Array, keep_trajectory: bool = False):
        """The jitted sampling function on the batch ``args`` (``[B, ...]`` arrays or None, as
        :meth:`_sample_impl`), or once per row (``batch_invariant``). Returns NumPy ``(images, latents
        [T, B, ...] or None)``."""
        params = self._params()
        if not self.batch_invariant:
            images, traj = self._sample(params, *args, guidance, keep_trajectory=keep_trajectory)
            return distributed.gather(images), None if traj is None else distributed.gather(traj)
        rows = [self._sample(params, *[None if a is None else a[i:i + 1] for a in args], guidance,
                             keep_trajectory=keep_trajectory) for i in range(args[0].shape[0])]
        images = np.concatenate([np.asarray(r[0]) for r in rows])
        return images, (np.concatenate([np.asarray(r[1]) for r in rows], axis=1) if keep_trajectory else None)

    def _sample_impl(self, params, cond, uncond, seeds, schedule, init_latents, guidance,
                     keep_trajectory=False):
        """Traced body. ``cond, uncond [B, M, D]``, ``seeds [B]``, ``schedule [B, T, L]`` or None,
        ``init_latents [B, h, w, c]`` or None (drawn from the seeds), ``guidance [T]``."""
        self._traces[0] += 1
        sched = self.sched
        keys = jax.vmap(jax.random.key)(seeds)                       # [B] one stream per prompt
        draw = jax.vmap(lambda k, purpose, i: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(k, purpose), i), self.latent_shape), (0, None, None))
        latents = draw(keys, 0, 0) if init_latents is None else init_latents  # [B, h, w, c]
        latents = latents * sched.init_noise_sigma
        names = None if self.quant is None else self.quant.registry.names

        def body(carry, step):
            x, state = carry
            i, rows = step
            q = None
            if schedule is not None:
                idx = schedule[:, i]                                 # [B, L]
                q = QuantArgs.from_indices(params["quant"], jnp.concatenate([idx, idx]), names,
                                           self.quant.config, step=i, int8=self.int8)
                q = dataclasses.replace(q, prepared=rows)
            # (DDIM, PNDM and DPM-Solver++ need no model-input scaling)
            g = guidance[i]
            eps = guided_output(self.unet, params["unet"], x, sched.timesteps[i], cond, uncond, g, q,
                                self.guidance_rescale)
            noise = draw(keys, 1, i)                                  # DDIM eta > 0 only
            sigma = None
            if q is not None and self._ptqd:                         # PTQD output correction
                eps, sigma = correction.sampler_correction(params["ptqd"], sched, i, idx, eps, g,
                                                     self._mac_share, self.quant.config.num_quantized)
            x_next, state = schedulers.step(sched, state, i, eps, x, noise, sigma=sigma)
            return (x_next, state), (x if keep_trajectory else None)

        rows = None
        if schedule is not None and self.prepare_rows:
            # every step's per-layer quantizer rows before the loop, one [T, ...] array per layer, read
            # at step i as scan inputs: a layer's kernels then do not depend on the layer's position,
            # and XLA compiles those of equal shapes once (see prepare_rows)
            idx = jnp.swapaxes(schedule, 0, 1)                                  # [T, B, L]
            steps = jnp.broadcast_to(jnp.arange(self.num_steps, dtype=jnp.int32)[:, None],
                                     (self.num_steps, 2 * idx.shape[1]))
            rows = jax.vmap(lambda ix, st: prepare_rows(params["quant"], jnp.concatenate([ix, ix]), names,
                                                        self.quant.config, st))(idx, steps)
        state = schedulers.init_state(sched, latents)
        (latents, _), traj = jax.lax.scan(body, (latents, state), (jnp.arange(self.num_steps), rows))
        z = unscale_latents(self.sd.configs.vae, latents)
        decode = lambda zz: to_uint8(self.vae.apply({"params": params["vae"]}, zz, method=self.vae.decode))  # noqa: E731
        if self.decode_one_by_one:   # [B, ...] -> [B, 1, ...]: one image's VAE activations alive at a time
            return jax.lax.map(decode, z[:, None])[:, 0], traj
        return decode(z), traj
