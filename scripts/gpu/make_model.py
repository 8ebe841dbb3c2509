"""Random-init model folders with the exact shapes of the GPU benchmarks (no weights downloaded).

    python scripts/gpu/make_model.py llama-1b  models/llama-1b                 # tokenizer: .gpu/llama_tokenizer
    python scripts/gpu/make_model.py llama2-7b models/llama2-7b --tokenizer path/to/llama_tokenizer

The tokenizer is the real Llama-2 one (a folder holding its `tokenizer.model` and a
`tokenizer_config.json` naming LlamaTokenizer; `scripts/gpu/fetch_wheels.sh` builds it in
.gpu/llama_tokenizer), so sample lengths, packing and tokens/s are those of real instruction
data. Its 32,000 ids fit both vocabularies (32,000 and 128,256): the 1B shape keeps Llama-3's
embedding size, which is what its FLOPs and memory depend on.

Weights are bf16, initialised directly in bf16 on the GPU when there is one (seconds), else on the
CPU, and written with save_pretrained (safetensors).
"""

import sys
from pathlib import Path

import fire
import torch

SHAPES = {
    # 1B Llama shape: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 128256 (Llama-3.2-1B's).
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
                     rope_theta=500000.0),
    # Llama-2-7B shape.
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}


def make(shape: str, out: str, tokenizer: str = ".gpu/llama_tokenizer", seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        sys.exit(f"error: unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    if not (Path(tokenizer) / "tokenizer_config.json").is_file():
        sys.exit(f"error: {tokenizer} is not a tokenizer folder (no tokenizer_config.json); "
                 "bash scripts/gpu/fetch_wheels.sh DATA_DIR builds .gpu/llama_tokenizer")
    if Path(out).exists() and any(Path(out).iterdir()):
        sys.exit(f"error: {out} exists and is not empty; remove it or pick another folder")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > SHAPES[shape]["vocab_size"]:
        sys.exit(f"error: the tokenizer has {len(tok)} ids, more than the {shape} vocabulary "
                 f"({SHAPES[shape]['vocab_size']})")
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(seed)
    # Built directly in bf16 (half the memory and time of an fp32 build cast afterwards: 7B in fp32
    # is 27 GB).
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    print(f"{shape}: {n / 1e9:.3f}B parameters, {len(tok)}-id tokenizer -> {out}")


if __name__ == "__main__":
    fire.Fire(make)
