"""The "embedded default": a tiny model, tokenizer and instruction dataset the harness ships with.

Running the trainer with no ``--model`` / ``--data`` must work offline, on CPU, in seconds, and
must still show a real learning curve.  Nothing here is downloaded or copied from elsewhere:

* **Data.**  ``generate_sample_instructions`` produces synthetic Alpaca-schema rows
  (``instruction`` / ``input`` / ``output``) from a handful of simple task families (reverse
  words, sort numbers, add, uppercase, opposites, count, repeat, pick the larger number).  The
  outputs are short and regular, so a 2-layer model visibly starts learning them within ~100
  optimizer steps.  The bundled ``assets/sample_instructions*.jsonl`` files are exactly what
  ``python -m harness.default_assets`` writes, so they are reproducible from this code.
* **Tokenizer.**  ``train_tokenizer`` trains a sentencepiece BPE model in-process and re-expresses
  it as a Hugging Face ``tokenizers`` BPE (``tokenizer.json``) that gives the same ids as the
  sentencepiece processor.  The obvious alternatives are broken in transformers 5.x: the
  ``LlamaTokenizer`` constructor ignores ``vocab_file``, and the sentencepiece-backed slow class
  strips whitespace and prints byte-fallback pieces literally (``<0x0A>``) on decode.
* **Model.**  ``build_tiny_model`` writes a randomly initialised Llama-shape model (64 hidden,
  2 layers) next to the tokenizer, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load one folder.
* **Cache.**  ``default_model_dir`` builds that folder once per (data, format, shape) key under
  ``$HARNESS_CACHE`` and publishes it with an atomic rename, so concurrent ranks and crashed
  builds can never expose a half-written model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.tasks.instruction import PROMPT_NO_INPUT, PROMPT_WITH_INPUT  # one source for the template

logger = logging.getLogger(__name__)

# Bump whenever the tokenizer/model recipe changes so stale caches are not reused.
FORMAT_VERSION = 1

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TRAIN_FILE = "sample_instructions.jsonl"
EVAL_FILE = "sample_instructions_eval.jsonl"
TRAIN_ROWS, TRAIN_SEED = 800, 0
EVAL_ROWS, EVAL_SEED = 100, 1

VOCAB_SIZE = 512
MODEL_SEED = 0
MODEL_SHAPE: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 176,
    "max_position_embeddings": 512,
}

# Kept next to tokenizer.json for reference and tests.  Deliberately not named
# "tokenizer.model": transformers would then try to rebuild the tokenizer from it.
SPM_MODEL_FILE = "spm.model"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

DEFAULT_CACHE = "~/.cache/llm-ft-harness"
# A build takes seconds; a partial build older than this belongs to a crashed process.
STALE_BUILD_SECONDS = 3600

# ---------------------------------------------------------------------------------------------
# Synthetic instruction data
# ---------------------------------------------------------------------------------------------

WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum "
    "cat dog bird fish horse mouse sheep tiger "
    "red blue green yellow black white "
    "book chair table lamp door window river cloud stone tree"
).split()

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("old", "new"), ("wet", "dry"), ("high", "low"), ("long", "short"), ("day", "night"),
    ("left", "right"), ("yes", "no"), ("win", "lose"), ("strong", "weak"), ("first", "last"),
)
_OPPOSITE_OF = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}

Row = dict[str, str]


def _row(instruction: str, input_text: str, output: str) -> Row:
    return {"instruction": instruction, "input": input_text, "output": output}


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _reverse_words(rng: random.Random) -> Row:
    words = _words(rng, 2, 8)
    instruction = rng.choice(
        ("Reverse the order of these words.", "Write the words in reverse order.")
    )
    return _row(instruction, " ".join(words), " ".join(reversed(words)))


def _sort_numbers(rng: random.Random) -> Row:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    instruction = rng.choice(
        ("Sort these numbers from smallest to largest.", "Put the numbers in increasing order.")
    )
    return _row(instruction, " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers))))


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return _row(f"What is {a} plus {b}?", "", str(a + b))
    return _row("Add the two numbers.", f"{a} {b}", str(a + b))


def _uppercase(rng: random.Random) -> Row:
    words = _words(rng, 1, 3)
    if len(words) == 1 and rng.random() < 0.5:
        return _row(f"Spell {words[0]} in capital letters.", "", words[0].upper())
    text = " ".join(words)
    return _row("Convert the text to uppercase.", text, text.upper())


def _opposite(rng: random.Random) -> Row:
    word = rng.choice(sorted(_OPPOSITE_OF))
    if rng.random() < 0.5:
        return _row(f"What is the opposite of {word}?", "", _OPPOSITE_OF[word])
    return _row("Give the opposite of the word.", word, _OPPOSITE_OF[word])


def _count(rng: random.Random) -> Row:
    words = _words(rng, 1, 9)
    instruction = rng.choice(("How many words are in the list?", "Count the items."))
    return _row(instruction, " ".join(words), str(len(words)))


def _repeat(rng: random.Random) -> Row:
    word, times = rng.choice(WORDS), rng.randint(1, 10)
    output = " ".join([word] * times)
    count = "1 time" if times == 1 else f"{times} times"
    if rng.random() < 0.5:
        return _row(f"Repeat the word {word} {count}.", "", output)
    return _row(f"Repeat the word {count}.", word, output)


def _larger(rng: random.Random) -> Row:
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        return _row(f"Which number is larger: {a} or {b}?", "", str(max(a, b)))
    return _row("Pick the larger number.", f"{a} {b}", str(max(a, b)))


TASK_FAMILIES: tuple[Callable[[random.Random], Row], ...] = (
    _reverse_words, _sort_numbers, _add, _uppercase, _opposite, _count, _repeat, _larger,
)


def generate_sample_instructions(n: int, seed: int) -> list[Row]:
    """Return ``n`` synthetic Alpaca-schema rows; the same ``seed`` always gives the same rows."""
    rng = random.Random(seed)  # private RNG: callers' global random state is never touched
    return [rng.choice(TASK_FAMILIES)(rng) for _ in range(n)]


# Generated task data for tests and demos of the other tasks (never bundled: a seed makes it).
POSITIVE_WORDS = ("happy", "strong", "win", "light", "full", "early")
NEGATIVE_WORDS = ("sad", "weak", "lose", "dark", "empty", "late")
SENTIMENT_LABELS = ("negative", "positive")


def generate_sentiment_rows(n: int, seed: int) -> list[dict]:
    """Classification rows {"text", "label"}: a few distractor words around one sentiment word.

    Labels alternate, so any set of an even number of rows is exactly balanced and a model that
    ignores the text scores 50% accuracy at best.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = _words(rng, 2, 6)
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE_WORDS if label else NEGATIVE_WORDS))
        rows.append({"text": " ".join(words), "label": SENTIMENT_LABELS[label]})
    return rows


def generate_qa_rows(n: int, seed: int) -> list[dict]:
    """Flat QA rows {"context", "question", "answers"}: which colour is a named thing."""
    rng = random.Random(seed)
    colours = ("red", "blue", "green", "yellow", "black", "white")
    things = [w for w in WORDS if w not in colours]
    rows = []
    for _ in range(n):
        picked = rng.sample(things, 3)
        paint = {t: rng.choice(colours) for t in picked}
        context = " ".join(f"the {t} is {c}." for t, c in paint.items())
        asked = rng.choice(picked)
        rows.append({"context": context, "question": f"what colour is the {asked}?",
                     "answers": [paint[asked], f"{paint[asked]}."]})
    return rows


def render_prompt(row: Row) -> str:
    """The Alpaca prompt for ``row`` (everything the model sees before the response)."""
    if row["input"]:
        return PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return PROMPT_NO_INPUT.format(instruction=row["instruction"])


def rows_to_jsonl(rows: list[Row]) -> str:
    """Serialise rows exactly as the bundled files are written (one JSON object per line)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def default_data_path() -> Path:
    return ASSETS_DIR / TRAIN_FILE


def default_eval_data_path() -> Path:
    return ASSETS_DIR / EVAL_FILE


def write_sample_files(assets_dir: Path = ASSETS_DIR) -> None:
    """(Re)generate the bundled train and eval jsonl files."""
    assets_dir.mkdir(parents=True, exist_ok=True)
    for name, rows, seed in ((TRAIN_FILE, TRAIN_ROWS, TRAIN_SEED), (EVAL_FILE, EVAL_ROWS, EVAL_SEED)):
        text = rows_to_jsonl(generate_sample_instructions(rows, seed))
        (assets_dir / name).write_text(text, encoding="utf-8", newline="\n")


def _read_jsonl(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Every byte stays encodable, so no text ever maps to <unk>.
        byte_fallback=True,
        character_coverage=1.0,
        # Identity normalisation and no dummy prefix make decode(encode(x)) == x exactly and
        # encode(a + b) == encode(a) + encode(b) whenever a ends at a token boundary.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        # "\n" is kept without this too, but as a user-defined symbol it is always its own token,
        # so no piece spans a newline and the prompt (which ends in "\n") tokenizes to an exact
        # prefix of prompt + response.  That keeps label masking by prompt length correct.
        user_defined_symbols=["\n"],
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        # One thread and no sampling/shuffling make the trained model byte-for-byte reproducible.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _bpe_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and ranked merges that make a ``tokenizers`` BPE reproduce sentencepiece's ids.

    Sentencepiece BPE repeatedly merges the adjacent pair whose result has the highest score;
    ranking every split of each learned piece by that piece's score gives the same choices.
    Control, byte and user-defined pieces are atomic and never take part in merges.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    atomic = {
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
        or sp.id_to_piece(i) == "\n"
    }
    ranked = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if piece in atomic:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in atomic and right not in atomic:
                ranked.append((-sp.get_score(i), i, cut, left, right))
    ranked.sort()
    return vocab, [(left, right) for *_, left, right in ranked]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a sentencepiece BPE on ``texts`` and save it as a Hugging Face tokenizer folder.

    The folder holds ``tokenizer.json`` (loaded by ``AutoTokenizer``) plus the raw sentencepiece
    model as ``spm.model``.  Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3.  Encoding adds
    no special tokens: callers add BOS/EOS themselves.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm_bytes = _train_sentencepiece(texts, vocab_size)
    (out_dir / SPM_MODEL_FILE).write_bytes(spm_bytes)

    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    vocab, merges = _bpe_merges(sp)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # Sentencepiece pieces never cross a space, so splitting there first changes no ids; "never"
    # mirrors add_dummy_prefix=False.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        # The default clean-up would turn "a ." into "a." and break the round trip.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)


def tokenizer_training_texts(rows: list[Row]) -> list[str]:
    """What the tokenizer learns from: each row as the model will see it (prompt + response)."""
    return [render_prompt(row) + row["output"] for row in rows]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, seed: int = MODEL_SEED) -> None:
    """Write a randomly initialised tiny Llama plus its tokenizer into ``out_dir``."""
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **MODEL_SHAPE,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(tokenizer_dir / SPM_MODEL_FILE, out_dir / SPM_MODEL_FILE)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", DEFAULT_CACHE)).expanduser()


def _cache_key() -> str:
    recipe = json.dumps(
        {"format": FORMAT_VERSION, "vocab_size": VOCAB_SIZE, "shape": MODEL_SHAPE, "seed": MODEL_SEED},
        sort_keys=True,
    )
    digest = hashlib.sha256(default_data_path().read_bytes())
    digest.update(recipe.encode())
    return digest.hexdigest()[:12]


def _is_complete(model_dir: Path) -> bool:
    # Folders only appear under their final name via rename, so any file proves completeness;
    # config.json guards against someone creating the folder by hand.
    return (model_dir / "config.json").is_file()


def _remove_stale_builds(final: Path) -> None:
    """Delete partial builds abandoned by crashed processes; recent ones may still be running."""
    cutoff = time.time() - STALE_BUILD_SECONDS
    for partial in final.parent.glob(f"{final.name}.tmp*"):
        try:
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it up first


def _build_default_model(out_dir: Path) -> None:
    rows = _read_jsonl(default_data_path())
    with tempfile.TemporaryDirectory(prefix="harness-tokenizer-") as tokenizer_dir:
        train_tokenizer(tokenizer_training_texts(rows), Path(tokenizer_dir), VOCAB_SIZE)
        build_tiny_model(out_dir, Path(tokenizer_dir), MODEL_SEED)


def default_model_dir() -> Path:
    """Folder with the default model + tokenizer, built on first use and cached afterwards."""
    final = _cache_root() / f"default-model-{_cache_key()}"
    if _is_complete(final):
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    # Build beside the target and rename: readers never see a half-built folder, and a crash
    # leaves only a ".tmp" sibling that later calls ignore.
    partial = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        started = time.monotonic()
        _build_default_model(partial)
        try:
            os.rename(partial, final)
            logger.info("built default model in %.1fs at %s", time.monotonic() - started, final)
        except OSError:
            # Another process (e.g. a second rank) published first; its build is equivalent.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


if __name__ == "__main__":
    write_sample_files()
    for path in (default_data_path(), default_eval_data_path()):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
