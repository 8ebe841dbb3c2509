"""Random-init model folders with the exact shapes of the issue-8 targets (no weights downloaded).

    python scripts/gpu/make_model.py llama-1b  models/llama-1b        # tokenizer: the embedded default's
    python scripts/gpu/make_model.py llama2-7b models/llama2-7b --tokenizer path/to/hf_tokenizer_folder

Weights are bf16, initialised on the GPU when there is one (seconds), else on the CPU. The
tokenizer is any Hugging Face tokenizer folder whose ids fit the vocabulary; by default the
embedded default's (512 pieces, built locally): transformers 5.x cannot build a fast tokenizer
from the raw Llama-2 `tokenizer.model` or GPT-2 vocab/merges files here (both constructors come
back with an empty vocabulary), and throughput and MFU are per token, whatever the ids. With
512 pieces, English text becomes ~3x more tokens than with Llama's tokenizer: say so next to any
figure that depends on sample length.
"""

import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {
    # issue 8, target 1: "1B Llama-shape model (hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 128256)"
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
                     rope_theta=500000.0),
    # issue 8, target 3: Llama-2-7B shape
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}


def make(shape: str, out: str, tokenizer: str = "", seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness import default_assets

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    tok = AutoTokenizer.from_pretrained(tokenizer or default_assets.default_model_dir())
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    print(f"{shape}: {n / 1e9:.3f}B parameters -> {out}")

if __name__ == "__main__":
    fire.Fire(make)
