"""Procedural captioned scenes and the CLIP tokenizer."""

from qlip_jax.data.scenes import (DATA_VERSION, Caption, PromptRecord, Scene, SceneObject, StatedObject,
                                  make_caption, prompt_set, render, sample_scene, scene_of, split_seeds,
                                  training_batch)
from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe, load_tokenizer

__all__ = ["DATA_VERSION", "Caption", "PromptRecord", "Scene", "SceneObject", "StatedObject", "make_caption",
           "prompt_set", "render", "sample_scene", "scene_of", "split_seeds", "training_batch",
           "convert_clip_bpe", "find_clip_bpe", "load_tokenizer"]
