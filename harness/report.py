"""The preflight data report: what the data looks like after tokenization, before any training.

Printed on rank 0 at the end of preflight and saved as `output_dir/data_report.json`. Layout
numbers (tokens per step, padding or packing efficiency, bin fill) are measured on the steps of
the first epoch (at most the run's steps), which cover every row once; an epoch longer than
`LAYOUT_SAMPLE_STEPS` steps is measured on that many of its steps, drawn with the run's seed
(`steps_measured` < `steps_in_epoch` in the report says so), so the report costs the same at a
million rows as at a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness import data
from harness.batches import StepBatches

MAX_ROWS_LISTED = 100  # row indices written into the JSON per problem
LAYOUT_SAMPLE_STEPS = 512  # layout figures of a longer epoch are measured on this many seeded steps


@dataclass
class SourceReport:
    path: str
    weight: float | None
    stats: data.TokenizeStats
    rows_in_mix: int
    cache_hit: bool
    held_out: int = 0  # rows --eval_split kept out of training


def length_summary(lengths) -> dict:
    a = np.asarray(lengths)
    if not len(a):
        return {}
    return {"mean": round(float(a.mean()), 1), **{f"p{q}": int(np.percentile(a, q, method="lower")) for q in (50, 90, 99)},
            "max": int(a.max())}


def source_entry(src: SourceReport) -> dict:
    s = src.stats
    kept = s.rows - len(s.zero_supervised)
    return {
        "path": src.path,
        "weight": src.weight,
        "tokenization_cache_hit": src.cache_hit,
        "rows_read": s.rows,
        "rows_kept": kept,
        "rows_held_out_for_eval": src.held_out,
        "rows_in_mix": src.rows_in_mix,
        "rows_dropped": {
            "no_supervised_token_after_truncation": {
                "count": len(s.zero_supervised),
                "share": len(s.zero_supervised) / s.rows,
                "error_above_share": data.MAX_ZERO_SUPERVISED_SHARE,
                "rows": s.zero_supervised[:MAX_ROWS_LISTED],
            },
        },
        "prompt_tokens": length_summary(s.prompt_lengths),
        "target_tokens": length_summary(s.target_lengths),
        "rows_truncated": {"prompt": s.prompt_truncated, "target_lost_eos": s.target_truncated,
                           # far longer than seq_len tokens could hold: cut by characters first (data.char_limit)
                           "cut_by_chars_before_tokenization": s.cut_by_chars},
        "targets_ending_with_trained_eos": s.ends_with_eos,
    }


def measured_steps(steps: int, seed: int) -> list[int]:
    """Every step of the epoch, or LAYOUT_SAMPLE_STEPS of them drawn with the seed."""
    if steps <= LAYOUT_SAMPLE_STEPS:
        return list(range(steps))
    return sorted(np.random.default_rng(seed).choice(steps, LAYOUT_SAMPLE_STEPS, replace=False).tolist())


def layout_entry(batches: StepBatches, steps: int, seq_len: int) -> dict:
    real = slots = supervised = bins = 0
    measured = measured_steps(steps, batches.sampler.seed)
    for step in measured:
        step_real, step_slots = batches.slots(step)
        real, slots = real + step_real, slots + step_slots
        supervised += int(batches.rows.supervised[batches.sampler.step_rows(step)].sum())
        if batches.packing:
            bins += sum(len(m) for rank in batches.layout(step) for m in rank)
    n = len(measured)
    entry = {
        "layout": "packed" if batches.packing else "padded",
        "steps_measured": n,
        "steps_in_epoch": steps,  # more than steps_measured: a seeded sample of the epoch's steps
        "samples_per_step": batches.sampler.global_batch,
        "tokens_per_step": real / n,
        "supervised_tokens_per_step": supervised / n,
        "token_slots_per_step": slots / n,
        "efficiency": real / slots,  # real tokens / token slots the forward passes compute
    }
    if batches.packing:
        entry.update(bins_per_step=bins / n, bin_fill_rate=real / (bins * seq_len))
    return entry


def build(sources: list[SourceReport], tokenizer, batches: StepBatches, steps: int, seq_len: int) -> dict:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return {
        "sources": [source_entry(s) for s in sources],
        "rows_in_training_set": len(batches.rows),
        "special_tokens": {
            "eos_id": eos,
            "pad_id": data.pad_id(tokenizer),
            "pad_is_eos": pad is None or pad == eos,
            # Labels are built from the token lists, never by masking the pad id, so EOS stays
            # a target even when the pad id is the EOS id; this counts the rows that prove it.
            "eos_trained": any(s.stats.ends_with_eos for s in sources),
        },
        "steps": layout_entry(batches, steps, seq_len),
    }


def summary(report: dict) -> str:
    lines = ["data report:"]
    for s in report["sources"]:
        dropped = s["rows_dropped"]["no_supervised_token_after_truncation"]
        lines.append(f"  {s['path']}: {s['rows_read']} rows read, {dropped['count']} dropped (no supervised token), "
                     f"{s['rows_in_mix']} in the mix; truncated: {s['rows_truncated']['prompt']} prompts, "
                     f"{s['rows_truncated']['target_lost_eos']} targets"
                     + (f" ({s['rows_truncated']['cut_by_chars_before_tokenization']} rows first cut by characters)"
                        if s['rows_truncated'].get('cut_by_chars_before_tokenization') else "")
                     + f"; cache {'hit' if s['tokenization_cache_hit'] else 'miss'}")
        for part in ("prompt_tokens", "target_tokens"):
            t = s[part]
            lines.append(f"    {part}: mean {t['mean']} p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}")
    sp, st = report["special_tokens"], report["steps"]
    lines.append(f"  eos {sp['eos_id']} pad {sp['pad_id']} (pad is eos: {sp['pad_is_eos']}, eos trained: {sp['eos_trained']})")
    fill = f", {st['bins_per_step']:.1f} bins/step, bin fill {st['bin_fill_rate']:.1%}" if "bin_fill_rate" in st else ""
    sample = (f" (measured on {st['steps_measured']} of the epoch's {st['steps_in_epoch']} steps)"
              if st["steps_measured"] < st["steps_in_epoch"] else "")
    lines.append(f"  {st['layout']}: {st['tokens_per_step']:.0f} tokens/step ({st['supervised_tokens_per_step']:.0f} "
                 f"supervised), efficiency {st['efficiency']:.1%} of {st['token_slots_per_step']:.0f} slots{fill}{sample}")
    return "\n".join(lines)
