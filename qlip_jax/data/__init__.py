"""Data: the sources of prompts and reference data (the user's files, or the procedural scenes), image
geometry shared with the metrics, and the CLIP tokenizer."""

from qlip_jax.data.scenes import (DATA_VERSION, Caption, PromptRecord, Scene, SceneObject, StatedObject,
                                  make_caption, prompt_set, render, sample_scene, scene_of, split_seeds,
                                  training_batch)
from qlip_jax.data.sources import DataError, DataSource, FileSource, SceneSource, open_source
from qlip_jax.data.tokenizer import convert_clip_bpe, find_clip_bpe, load_tokenizer

__all__ = ["DATA_VERSION", "Caption", "PromptRecord", "Scene", "SceneObject", "StatedObject", "make_caption",
           "prompt_set", "render", "sample_scene", "scene_of", "split_seeds", "training_batch",
           "DataError", "DataSource", "FileSource", "SceneSource", "open_source",
           "convert_clip_bpe", "find_clip_bpe", "load_tokenizer"]
