"""Generate tiny random-weight GGUF models (llama architecture) for tests and demos.

Why this exists: the router's tests and the offline demo need real ``llama-server``
processes that load a model and answer requests, but nothing may be downloaded.
This script writes small, deterministic, random-weight llama models with the PyPI
``gguf`` package.  They produce gibberish, but they load in a fraction of a second
and exercise every code path of ``llama-server`` (health, tokenize, completion,
chat completion with a ChatML template, streaming).

The vocabulary is SentencePiece-style (tokenizer model ``llama``): ``<unk>``,
``<s>``, ``</s>``, 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, the ChatML
control tokens ``<|im_start|>``/``<|im_end|>``, printable ASCII pieces and filler
pieces up to the requested vocabulary size.  Any text is tokenizable.

Sizes are parametric (``--n-embd``, ``--n-layer``, ``--n-ff``, ``--vocab``) so a
bigger model (tens or hundreds of MB) can be produced for prompt-processing
benchmarks.

Usage::

    python tests/make_tiny_models.py                 # models/tiny-a.gguf, models/tiny-b.gguf
    python tests/make_tiny_models.py --out /tmp/m --name big --n-embd 1024 --n-layer 8

Importable::

    from tests.make_tiny_models import make_model
    make_model(tmp_path / "tiny.gguf", seed=1)

Writes are atomic (temporary file in the target directory, then ``os.replace``),
and a file whose recorded generation parameters match is not rewritten unless
``force=True`` / ``--force``; concurrent test workers never see a partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFWriter, LlamaFileType, TokenType

# Bump when the layout of generated files changes, so cached files are regenerated.
GENERATOR_VERSION = 1
PARAMS_KEY = "llama_router.tiny_model.params"

DEFAULT_NAMES = ("tiny-a", "tiny-b")
DEFAULT_N_EMBD = 64
DEFAULT_N_LAYER = 2
DEFAULT_N_CTX_TRAIN = 8192
DEFAULT_VOCAB = 512
DEFAULT_SEED = 0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPM_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def build_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, types)`` of a byte-fallback SPM vocabulary of ``size`` tokens."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
    for special in ("<|im_start|>", "<|im_end|>"):
        tokens.append(special)
        types.append(TokenType.CONTROL)
    base = len(tokens)
    if size < base:
        raise ValueError(f"vocab must be at least {base} tokens, got {size}")

    pieces: list[str] = [SPM_SPACE]
    pieces += [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII except space
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [SPM_SPACE + c for c in letters]
    pieces += [a + b for a in letters for b in letters]
    pieces += [SPM_SPACE + a + b for a in letters for b in letters]
    seen = set(tokens)
    extra: list[str] = []
    for piece in pieces:
        if base + len(extra) >= size:
            break
        if piece not in seen:
            seen.add(piece)
            extra.append(piece)
    i = 0
    while base + len(extra) < size:
        filler = f"<unused{i}>"
        i += 1
        if filler not in seen:
            seen.add(filler)
            extra.append(filler)
    tokens += extra
    types += [TokenType.NORMAL] * len(extra)

    # Special/byte tokens score 0; normal pieces get decreasing (negative) scores
    # (the SPM tokenizer merges higher-scoring pieces first).
    scores: list[float] = [0.0] * base + [-float(k + 1) for k in range(len(extra))]
    return tokens, scores, [int(t) for t in types]


def _params_record(**params: Any) -> str:
    return json.dumps({"generator_version": GENERATOR_VERSION, **params}, sort_keys=True)


def _existing_params(path: Path) -> str | None:
    """Return the parameter record stored in an existing file, or None if unreadable."""
    try:
        reader = GGUFReader(path, "r")
        field = reader.get_field(PARAMS_KEY)
        if field is None:
            return None
        value = field.contents()
        return value if isinstance(value, str) else None
    except Exception:  # any unreadable/partial file just gets rewritten
        return None


def make_model(
    path: Path,
    *,
    n_embd: int = DEFAULT_N_EMBD,
    n_layer: int = DEFAULT_N_LAYER,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx_train: int = DEFAULT_N_CTX_TRAIN,
    seed: int = DEFAULT_SEED,
    vocab: int = DEFAULT_VOCAB,
    dtype: str = "f32",
    name: str | None = None,
    force: bool = False,
    split_max_tensors: int = 0,
) -> Path:
    """Write a random-weight llama GGUF model to ``path`` and return ``path``.

    ``n_head`` defaults to ``max(1, n_embd // 16)`` (head size 16 for tiny models,
    capped at head size 128 for big ones: ``n_embd // 128`` heads when that is larger),
    ``n_head_kv`` to ``n_head``, ``n_ff`` to ``4 * n_embd``.  ``dtype`` is ``"f32"``
    or ``"f16"`` for the 2-D weight matrices (norm vectors are always f32).
    ``name`` is ``general.name`` (default: the file stem).

    With ``split_max_tensors``, the model is written as a split model, as llama.cpp's
    ``gguf-split`` writes one: shards ``<stem>-00001-of-0000N.gguf`` beside ``path``
    of at most that many tensors each, with the ``split.no``/``split.count``/
    ``split.tensors.count`` keys; the first shard's path is returned.

    If ``path`` already exists and was generated with the same parameters it is
    left alone (unless ``force``).  The file is written to a temporary file in the
    same directory and renamed into place atomically.
    """
    path = Path(path)
    if n_head is None:
        n_head = max(1, n_embd // 16, n_embd // 128)
        # keep the head size even (RoPE) and dividing n_embd
        while n_head > 1 and (n_embd % n_head or (n_embd // n_head) % 2):
            n_head -= 1
    if n_head_kv is None:
        n_head_kv = n_head
    if n_ff is None:
        n_ff = 4 * n_embd
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError(f"head size n_embd/n_head ({head_dim}) must be even")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be divisible by n_head_kv ({n_head_kv})")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if min(n_embd, n_layer, n_ff, n_ctx_train) < 1:
        raise ValueError("sizes must be positive")
    if name is None:
        name = path.stem

    record = _params_record(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_ctx_train=n_ctx_train,
        seed=seed,
        vocab=vocab,
        dtype=dtype,
        name=name,
    )
    if not split_max_tensors and not force and path.is_file() and _existing_params(path) == record:
        return path

    tokens, scores, types = build_vocab(vocab)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    wtype = np.float32 if dtype == "f32" else np.float16

    def matrix(rows: int, cols: int) -> np.ndarray[Any, Any]:
        # numpy shape (rows, cols) == ggml ne [cols, rows]; scaled like a sane init
        w = rng.standard_normal((rows, cols), dtype=np.float32) * (1.0 / np.sqrt(cols))
        return w.astype(wtype)

    def norm() -> np.ndarray[Any, Any]:
        return np.ones(n_embd, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    if split_max_tensors:  # shards are written in a hidden folder beside, then moved into place
        folder = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
        tmp = folder / path.name
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, "llama", split_max_tensors=split_max_tensors)
        writer.add_name(name)
        writer.add_description("random-weight test model generated by tests/make_tiny_models.py")
        writer.add_string(PARAMS_KEY, record)
        writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)

        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(tokens.index("<|im_end|>"))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)
        writer.add_chat_template(CHATML_TEMPLATE)

        writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
        for i in range(n_layer):
            blk = f"blk.{i}"
            writer.add_tensor(f"{blk}.attn_norm.weight", norm())
            writer.add_tensor(f"{blk}.attn_q.weight", matrix(n_head * head_dim, n_embd))
            writer.add_tensor(f"{blk}.attn_k.weight", matrix(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"{blk}.attn_v.weight", matrix(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"{blk}.attn_output.weight", matrix(n_embd, n_head * head_dim))
            writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
            writer.add_tensor(f"{blk}.ffn_gate.weight", matrix(n_ff, n_embd))
            writer.add_tensor(f"{blk}.ffn_up.weight", matrix(n_ff, n_embd))
            writer.add_tensor(f"{blk}.ffn_down.weight", matrix(n_embd, n_ff))
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output.weight", matrix(n_vocab, n_embd))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if split_max_tensors:
            shards = sorted(folder.iterdir())
            for shard in shards:
                os.replace(shard, path.with_name(shard.name))
            folder.rmdir()
            return path.with_name(shards[0].name)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if split_max_tensors:
            shutil.rmtree(folder, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        raise
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate tiny random-weight llama GGUF models for tests and the offline demo.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models"), help="output directory (default: models/)"
    )
    parser.add_argument(
        "--name",
        nargs="+",
        default=None,
        help="model name(s); writes OUT/NAME.gguf each (default: tiny-a tiny-b)",
    )
    parser.add_argument(
        "--n-embd", type=int, default=DEFAULT_N_EMBD, help="embedding size (default: %(default)s)"
    )
    parser.add_argument(
        "--n-layer", type=int, default=DEFAULT_N_LAYER, help="number of blocks (default: %(default)s)"
    )
    parser.add_argument("--n-head", type=int, default=None, help="attention heads (default: n_embd/16)")
    parser.add_argument("--n-head-kv", type=int, default=None, help="KV heads (default: n_head)")
    parser.add_argument("--n-ff", type=int, default=None, help="feed-forward size (default: 4*n_embd)")
    parser.add_argument(
        "--n-ctx-train",
        type=int,
        default=DEFAULT_N_CTX_TRAIN,
        help="training context length (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size, >= 261 (default: %(default)s)"
    )
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight type (default: f32)")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="base seed; model i gets seed+i (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite files even if up to date")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names: list[str] = args.name or list(DEFAULT_NAMES)
    for i, name in enumerate(names):
        target = args.out / (name if name.endswith(".gguf") else f"{name}.gguf")
        make_model(
            target,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            n_ctx_train=args.n_ctx_train,
            seed=args.seed + i,
            vocab=args.vocab,
            dtype=args.dtype,
            name=target.stem,
            force=args.force,
        )
        print(f"{target} ({target.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
