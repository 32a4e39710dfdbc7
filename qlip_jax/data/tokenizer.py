"""CLIP's BPE tokenizer as a transformers ``CLIPTokenizer`` folder, built offline.

The CLIP BPE merges ship in the ``open-clip-torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``;
install it with ``pip install --no-deps open-clip-torch==3.3.0``, it declares torch). This module
converts them once into ``vocab.json`` + ``merges.txt`` with exactly CLIP's id assignment:
the 256 byte symbols, the same with an end-of-word marker ``</w>``, the 48,894 merges in order, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407), 49,408 ids in all. As in Stable
Diffusion's ``tokenizer/``, padding uses ``<|endoftext|>`` and the context is 77 tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from qlip_jax.atomic import atomic_write

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map, in CLIP's order (printable bytes first,
    each mapped to itself; the other 68 bytes, ascending, mapped to chr(256), chr(257), ...)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def find_clip_bpe() -> str:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` in the installed open_clip (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("CLIP BPE vocabulary not found: install it with "
                            "`pip install --no-deps open-clip-torch==3.3.0`")


def convert_clip_bpe(gz_path: str, out_dir: str) -> str:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) from CLIP's BPE file."""
    with gzip.open(gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with atomic_write(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with atomic_write(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with atomic_write(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
                   "do_lower_case": True, "errors": "replace", **special}, f, indent=2)
    return out_dir


def load_tokenizer(folder: str):
    """``transformers.CLIPTokenizer`` from a local folder (never the hub).

    Reads both layouts: ``vocab.json`` + ``merges.txt`` (SD v1.x folders, transformers 4 saves) and
    ``tokenizer.json`` alone (what transformers 5's ``save_pretrained`` writes)."""
    from transformers import CLIPTokenizer

    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if not has("tokenizer.json"):
        for name in ("vocab.json", "merges.txt"):
            if not has(name):
                from qlip_jax.errors import MissingFile

                raise MissingFile(
                    os.path.join(folder, name),
                    f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt "
                    f"(lacks {name})",
                    "build one with qlip_jax.data.tokenizer.convert_clip_bpe(find_clip_bpe(), folder)")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
