"""Random-init model folders with the exact shapes of the benchmarks (no weights downloaded).

    python scripts/gpu/make_model.py llama-1b  models/llama-1b                 # tokenizer: .gpu/llama_tokenizer
    python scripts/gpu/make_model.py llama2-7b models/llama2-7b --tokenizer path/to/llama_tokenizer
    python scripts/gpu/make_model.py llama2-7b models/llama2-7b --weights False   # config + tokenizer only (train_wrapped.py)
    python scripts/gpu/make_model.py llama-20m models/llama-20m --tokenizer $DATA/llama_tokenizer  # CPU benchmarks

The tokenizer is the real Llama-2 one (a folder holding its `tokenizer.model` and a
`tokenizer_config.json` naming LlamaTokenizer; `scripts/gpu/fetch_wheels.sh` builds it in
.gpu/llama_tokenizer), so sample lengths, packing and tokens/s are those of real instruction
data. Its 32,000 ids fit both vocabularies (32,000 and 128,256): the 1B shape keeps Llama-3's
embedding size, which is what its FLOPs and memory depend on.

Weights are bf16, initialised directly in bf16 on the GPU when there is one (seconds), else on the
CPU, and written with save_pretrained (safetensors). `--weights False` writes no weights: the folder
holds the config, the tokenizer and a `model.safetensors` of one placeholder value that matches no
parameter. launch/train.py refuses such a folder (every weight missing); `scripts/gpu/train_wrapped.py`
lets it through, and the harness's own loading code (ZeRO-3's load-time sharding included) then
initialises every weight randomly, as the model's init does. The 7B shape then costs no 13.5 GB
write and read; a run on such a folder measures speed and memory, and its losses start from
whatever the seed gives.

`tiny-1b` and `tiny-7b` are stand-ins with the same features (grouped KV heads and tied embeddings,
or neither) that build and train in seconds: the recipe's CPU dry run uses them.
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
    # ~20M Llama-2 shape for the CPU benchmarks (19.5M parameters, 16.4M of them in the embedding and the head).
    "llama-20m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    # Stand-ins of llama-1b and llama2-7b for the recipe's dry run on a CPU.
    "tiny-1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True,
                    rope_theta=500000.0),
    "tiny-7b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=172, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
}
PLACEHOLDER = "model.safetensors"  # the name from_pretrained looks for


def make(shape: str, out: str, tokenizer: str = ".gpu/llama_tokenizer", seed: int = 0, weights: bool = True) -> None:
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
    if not weights:
        from safetensors.torch import save_file  # only this branch writes safetensors by hand

        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        config.save_pretrained(out)
        save_file({"random_init_placeholder": torch.zeros(1)}, str(Path(out) / PLACEHOLDER), metadata={"format": "pt"})
        tok.save_pretrained(out)
        print(f"{shape}: {n / 1e9:.3f}B parameters, no weights (random init at load), {len(tok)}-id tokenizer -> {out}")
        return
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
