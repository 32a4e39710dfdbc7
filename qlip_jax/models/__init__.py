"""Stable Diffusion v1 in Flax: UNet (quantizable), VAE, CLIP text encoder, configs, weight I/O."""

from qlip_jax.models.clip import CLIPTextModel, load_text_encoder, save_text_encoder
from qlip_jax.models.configs import CLIPTextConfig, ConfigError, UNetConfig, VAEConfig
from qlip_jax.models.io import WeightLoadError
from qlip_jax.models.unet import UNet2DConditionModel, load_unet, save_unet, unet_registry
from qlip_jax.models.vae import AutoencoderKL, load_vae, save_vae

__all__ = ["CLIPTextModel", "load_text_encoder", "save_text_encoder", "CLIPTextConfig", "ConfigError",
           "UNetConfig", "VAEConfig", "WeightLoadError", "UNet2DConditionModel", "load_unet", "save_unet",
           "unet_registry", "AutoencoderKL", "load_vae", "save_vae"]
