"""Verifiable parallel-decoding tasks (in the spirit of ParallelBench): a wrong joint is an invalid answer.

Every task prompt reads `<task>: <item> <item> ... =` and the answer follows it after one
space; the answer ends at the first EOS (`base.decode` cuts there) or newline. Each task's
answer has several valid forms or depends on tokens decoded in the same pass, so drawing
positions independently from their marginals (parallel decoding) breaks it, while the
model's true joint (exact, K = 1) keeps it valid:

- list:    "list: cat dog sun fish hat =" -> the 5-7 given words, each exactly once, in any
           order (" hat sun cat fish dog"). Every answer position's marginal spreads over all
           the words, so independent draws repeat some and drop others.
- shuffle: "shuffle: cat dog sun fish hat =" -> the 5-7 given words, each exactly once, in any
           order but the given one (" dog hat fish sun cat"). `list` with one more constraint
           on the whole answer; a random order is the given one with probability 1/n! only, so
           in practice it measures what `list` does, under a second prompt.
- pick:    "pick: cat dog sun fish =" -> one of the 4-6 given words, written once for each given
           word (" sun sun sun sun"). Every position's marginal is uniform over the given words
           and the joint puts all its mass on the diagonal: independent draws agree on one word
           with probability n * (1/n)^n (1/64 for 4 words), while exact decoding only has to copy
           the first word it wrote.
- reverse: "reverse: cat dog sun fish =" -> the 4-6 words in reverse order (" fish sun dog cat").
           One valid answer: a control where the model is sure of every token, so parallel
           decoding should stay valid unless the model is unsure of the alignment.
- either:  "either: red fox | blue sky tree =" -> one of the two word groups, copied in full
           (" red fox" or " blue sky tree"); groups of 1-4 words, of different lengths, 6 words at
           most. The answer's length varies with the group chosen: where it ends (the EOS) and
           what its words are must agree, so a rule that fixes the end of the answer apart from
           its words (independent draws, or confident end positions written before the words)
           mixes the groups (" red sky tree", " blue fox").

The answers of the first four fill most of the generation region (DEFAULT_GEN_LENGTH = 10 tokens: up
to 7 answer words and the EOS), so a confident rule cannot gain its speed from EOS padding alone;
`either`'s 1-4 words leave the rest to EOS, as answers of varying length do.

What earlier task models (4 layers, 0.92M parameters) could not learn (models/task-base/README.md):
a `pick` of made-up three-syllable words (exact decoding 0.000: their BPE pieces differ from word
to word), a `pick` of two-word compounds ("catsun", exact 0.265: it drew each half on its own, as
if the second half did not depend on the first, so copying the half that follows the first needs
an induction step it did not form in 16,000 steps), and `shuffle` as a derangement (no word at its
own place; exact 0.425, about the 0.37 a random permutation gives: it never learned to avoid its
own place). The current `shuffle` asks what the frontier issue asked (differ from the input
order) and `pick` asks for agreement between the answer's positions (a copy within the answer).

Validators are reference-free: they read the task and its items from the prompt alone.

Training data (`write_task_data`): one JSONL record per example in the prompt-completion
format, {"prompt": "list: cat dog sun fish hat =", "completion": " hat sun cat fish dog"}. Train the base with
`adjust train-base --packing documents`: every training sequence is then one example from
position 0, followed by EOS padding to the batch's length, exactly what generation gives the
model (prompt at position 0, answer, EOS to the end of the generation region), and only the
completion is masked and scored. What was measured on the pipeline's 4-layer model: lr 2e-3
never learned to copy (random windows of a joined stream, 4,500 steps; documents with a tied
head, 3,000 steps; untied, 1,000 steps); lr 1e-3 with documents and an untied head did (list of 3-5 words, the first task set: 89% valid
with exact decoding after 10,000 steps). Stream windows at lr 1e-3 were not tried.
Held-out prompts are disjoint from training by construction: an example belongs to the eval
split iff a hash of (task, item set) falls in a fixed tenth.

Run as a module to write files:
  python -m adjust.eval.tasks data    --out data/tasks/train.jsonl --n 60000 --seed 0
  python -m adjust.eval.tasks prompts --out data/tasks/eval.jsonl  --n 200 --split eval --seed 1
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdjustError

DEFAULT_GEN_LENGTH = 10
EVAL_BUCKETS = 10  # one in EVAL_BUCKETS item sets is held out for evaluation

# Short common English words; each becomes one BPE token once the tokenizer sees the data.
WORDS = (
    "cat dog sun sky red blue tree fish bird milk book door hat cup pen box car bus map key "
    "bed egg ice ink jam owl pig rat bee cow fox hen ant bag cake coin drum frog gold lamp"
).split()


@dataclass
class Example:
    task: str
    prompt: str
    answer: str  # one valid answer (for training data); validity never compares to it
    items: list[str] = field(default_factory=list)

    def check(self, answer_text: str) -> bool:
        return is_valid(self.prompt, answer_text)

    def record(self) -> dict:
        """The evaluation record."""
        return {"task": self.task, "prompt": self.prompt,
                "meta": {"items": self.items, "answer": self.answer}}


class Task:
    name = ""
    description = ""

    def items(self, rng: random.Random) -> list[str]:
        raise NotImplementedError

    def answer(self, items: list[str], rng: random.Random) -> list[str]:
        raise NotImplementedError

    def valid_words(self, items: list[str], words: list[str]) -> bool:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    def prompt(self, items: list[str]) -> str:
        return f"{self.name}: {' '.join(items)} ="

    def example(self, rng: random.Random) -> Example:
        items = self.items(rng)
        return Example(self.name, self.prompt(items), " ".join(self.answer(items, rng)), items)

    def is_valid(self, prompt: str, answer_text: str) -> bool:
        items = parse_prompt(prompt)[1]
        return self.valid_words(items, answer_words(answer_text))


class ListTask(Task):
    name = "list"
    description = "list the 5-7 given words, each exactly once, in any order"
    sizes = (5, 7)

    def items(self, rng):
        return rng.sample(WORDS, rng.randint(*self.sizes))

    def answer(self, items, rng):
        return rng.sample(items, len(items))

    def valid_words(self, items, words):
        return sorted(words) == sorted(items)


class ShuffleTask(ListTask):
    """The items of `list`; the answer is any other order of them."""

    name = "shuffle"
    description = "the 5-7 given words, each exactly once, in any order but the given one"

    def answer(self, items, rng):
        while True:  # rejection sampling: the given order is one of 120-5040 permutations
            out = rng.sample(items, len(items))
            if out != items:
                return out

    def valid_words(self, items, words):
        return sorted(words) == sorted(items) and words != items


class PickTask(ListTask):
    """4-6 common words; one of them, written once per given word."""

    name = "pick"
    description = "one of the 4-6 given words, written once for each given word"
    sizes = (4, 6)

    def answer(self, items, rng):
        return [rng.choice(items)] * len(items)

    def valid_words(self, items, words):
        return len(words) == len(items) and len(set(words)) == 1 and words[0] in items


class ReverseTask(ListTask):
    """4-6 common words; one valid answer."""

    name = "reverse"
    description = "copy the 4-6 given words in reverse order"
    sizes = (4, 6)

    def answer(self, items, rng):
        return items[::-1]

    def valid_words(self, items, words):
        return words == items[::-1]


class EitherTask(Task):
    """Two groups of 1-4 words, of different lengths, split by "|"; one of them, copied in full."""

    name = "either"
    description = "one of the two given word groups (1-4 words each, of different lengths), copied in full"
    lengths = (1, 4)  # words per group; the two groups differ in length and hold at most max_words words together
    max_words = 6
    separator = "|"

    def items(self, rng):
        while True:
            a, b = (rng.randint(*self.lengths) for _ in range(2))
            if a != b and a + b <= self.max_words:
                break
        words = rng.sample(WORDS, a + b)
        return words[:a] + [self.separator] + words[a:]

    def groups(self, items: list[str]) -> list[list[str]]:
        """The word groups of `items` (split at the separator)."""
        out = [[]]
        for w in items:
            if w == self.separator:
                out.append([])
            else:
                out[-1].append(w)
        return out

    def answer(self, items, rng):
        return rng.choice(self.groups(items))

    def valid_words(self, items, words):
        return words in self.groups(items)


TASKS: dict[str, Task] = {t.name: t for t in (ListTask(), ShuffleTask(), PickTask(), ReverseTask(), EitherTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AdjustError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """("list", ["cat", "dog"]) from "list: cat dog ="; AdjustError if it is not a task prompt."""
    head, colon, rest = prompt.strip().partition(":")
    rest = rest.strip()
    if not colon or head not in TASKS or not rest.endswith("="):
        raise AdjustError(f"not a task prompt (expected '<task>: items... ='): {prompt!r}")
    return head, rest[:-1].split()


def task_of(prompt: str) -> str:
    return parse_prompt(prompt)[0]


def answer_words(answer_text: str) -> list[str]:
    """The answer's words: text up to the first newline or literal EOS, split on whitespace."""
    from ..base.tiny import EOS

    text = answer_text.split(EOS, 1)[0].split("\n", 1)[0]
    return text.split()


def is_valid(prompt: str, answer_text: str) -> bool:
    """Whether `answer_text` (the generation after the prompt) is a valid answer to the task prompt."""
    return TASKS[task_of(prompt)].is_valid(prompt, answer_text)


def split_of(task: str, items: list[str]) -> str:
    """"eval" for a fixed tenth of (task, item set) pairs, "train" otherwise (independent of seeds)."""
    key = f"{task}|{' '.join(sorted(items))}".encode()
    return "eval" if int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % EVAL_BUCKETS == 0 else "train"


def examples(task: str, n: int, seed: int, split: str = "train") -> list[Example]:
    """`n` examples of one task from one split, reproducible by (task, seed, split)."""
    if split not in ("train", "eval"):
        raise AdjustError(f"split must be 'train' or 'eval', got {split!r}")
    t = get_task(task)
    rng = random.Random(f"{task}:{seed}:{split}")
    out: list[Example] = []
    while len(out) < n:
        ex = t.example(rng)
        if split_of(task, ex.items) == split:
            out.append(ex)
    return out


def _tasks_arg(tasks) -> list[str]:
    tasks = list(TASKS) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    for name in tasks:
        get_task(name)
    if not tasks:
        raise AdjustError("no tasks selected")
    return tasks


def _write_jsonl(out, records) -> int:
    from ..io import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return len(records)


def training_record(ex: Example) -> dict:
    """One training example in the prompt-completion format (train-base --packing documents adds the EOS)."""
    return {"prompt": ex.prompt, "completion": f" {ex.answer}"}


def write_task_data(out_jsonl, n_examples: int, seed: int = 0, tasks=None) -> int:
    """Training records {"prompt", "completion"}, one example each, tasks interleaved; train split only."""
    tasks = _tasks_arg(tasks)
    if n_examples < 1:
        raise AdjustError(f"--n must be at least 1, got {n_examples}")
    per = [n_examples // len(tasks) + (i < n_examples % len(tasks)) for i in range(len(tasks))]
    pools = [examples(t, k, seed, "train") for t, k in zip(tasks, per)]
    order = [(i, j) for i, pool in enumerate(pools) for j in range(len(pool))]
    random.Random(f"mix:{seed}").shuffle(order)
    return _write_jsonl(out_jsonl, [training_record(pools[i][j]) for i, j in order])


def write_task_prompts(out_jsonl, n: int, seed: int = 1, tasks=None, split: str = "eval") -> int:
    """`n` prompts of each task as {"task", "prompt", "meta"}; the eval split is held out of training."""
    tasks = _tasks_arg(tasks)
    if n < 1:
        raise AdjustError(f"--n must be at least 1, got {n}")
    return _write_jsonl(out_jsonl, [ex.record() for t in tasks for ex in examples(t, n, seed, split)])


def read_task_prompts(path) -> list[dict]:
    """Records {"task", "prompt"} of a .jsonl written by write_task_prompts, or a file of one prompt a line."""
    from ..data import read_prompt_file

    out = [{"task": task_of(prompt), "prompt": prompt} for prompt in read_prompt_file(path)]
    if not out:
        raise AdjustError(f"no prompts in {path}")
    return out


# --- evaluation -------------------------------------------------------------------------------
def evaluate_tasks(base, sampler, prompts, strategies, gen_length: int = DEFAULT_GEN_LENGTH, seed: int = 0,
                   sampling=None, num_samples: int = 1, batch_size: int = 64, examples_kept: int = 3,
                   progress: bool = False, block_length: int | None = None, cache: str = "none",
                   cache_refresh: int | None = None, unroll: str = "full", cache_verify: int = 0) -> dict:
    """Validity of each strategy's answers, per task.

    prompts: records {"task", "prompt"} or prompt strings; strategies: a spec string
    ("exact,parallel:2,adjust:2"), (name, params) pairs or strategy objects. Returns
    {"results": [row per (task, strategy)], "validity": {task: {label: fraction}}, ...};
    a row holds the task, strategy name, label, K, validity, n, tokens per full pass (the
    achieved K), full and sampler passes, seconds and a few invalid answers. The task "all"
    pools every prompt. `block_length`, `cache`, `cache_refresh`, `cache_verify`, `unroll`: as in `decode.generate`.
    """
    from ..decode import generate_texts, unroll_plan
    from ..sampling import SamplingConfig
    from .specs import build_strategy, parse_strategy_specs, spec_label

    sampling = sampling or SamplingConfig()
    unroll_plan(unroll)
    if isinstance(strategies, str):
        strategies = parse_strategy_specs(strategies)
    built = []
    for s in strategies:
        if isinstance(s, tuple):
            built.append((spec_label(*s), build_strategy(*s)))
        else:
            built.append((s.describe(), s))
    records = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    for r in records:
        r.setdefault("task", task_of(r["prompt"]))
    if not records:
        raise AdjustError("no prompts to evaluate")
    by_task: dict[str, list[str]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["prompt"])

    rows, validity = [], {}
    for label, strategy in built:
        pooled = {"valid": 0, "n": 0, "row_passes": 0, "full_passes": 0, "sampler_passes": 0, "seconds": 0.0}
        for task, task_prompts in by_task.items():
            samples, stats = generate_texts(base, task_prompts, strategy, sampling, gen_length=gen_length,
                                            num_samples=num_samples, batch_size=batch_size, seed=seed,
                                            sampler=sampler, progress=progress, block_length=block_length,
                                            cache=cache, cache_refresh=cache_refresh, unroll=unroll,
                                            cache_verify=cache_verify)
            ok = [is_valid(s["prompt"], s["text"]) for s in samples]
            bad = [{"prompt": s["prompt"], "answer": s["text"]} for s, v in zip(samples, ok) if not v]
            d = stats.to_dict()
            rows.append({"task": task, "strategy": strategy.name, "label": label, "K": strategy.k,
                         "valid": round(sum(ok) / len(ok), 4), "n": len(ok),
                         "tokens_per_full_pass": d["tokens_per_full_pass"], "full_passes": d["full_passes"],
                         "sampler_passes": d["sampler_passes"], "seconds": d["seconds"],
                         "invalid_examples": bad[:examples_kept]})
            validity.setdefault(task, {})[label] = rows[-1]["valid"]
            pooled["valid"] += sum(ok)
            pooled["n"] += len(ok)
            pooled["row_passes"] += stats.row_passes
            pooled["full_passes"] += stats.full_passes
            pooled["sampler_passes"] += stats.sampler_passes
            pooled["seconds"] += stats.seconds
        rows.append({"task": "all", "strategy": strategy.name, "label": label, "K": strategy.k,
                     "valid": round(pooled["valid"] / pooled["n"], 4), "n": pooled["n"],
                     "tokens_per_full_pass": round(gen_length * pooled["n"] / max(1, pooled["row_passes"]), 4),
                     "full_passes": pooled["full_passes"], "sampler_passes": pooled["sampler_passes"],
                     "seconds": round(pooled["seconds"], 4)})
        validity.setdefault("all", {})[label] = rows[-1]["valid"]
    from ..provenance import code_version

    return {"validity": validity, "results": rows, "gen_length": gen_length, "num_samples": num_samples,
            "seed": seed, "sampling": sampling.__dict__, "prompts": {t: len(p) for t, p in by_task.items()},
            # how many of each task's prompts are in the held-out split (a file of train-split prompts is not)
            "held_out": {t: sum(split_of(*parse_prompt(q)) == "eval" for q in p) for t, p in by_task.items()},
            "block_length": block_length, "cache": cache, "cache_refresh": cache_refresh, "cache_verify": cache_verify,
            "unroll": unroll,
            "code_version": code_version()}


def format_table(result: dict) -> str:
    """A plain-text table: one line per (strategy, task)."""
    lines = [f"{'strategy':<22} {'task':<8} {'valid':>6} {'n':>5} {'tok/pass':>8} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"{r['label']:<22} {r['task']:<8} {r['valid']:>6.3f} {r['n']:>5} "
                     f"{r['tokens_per_full_pass']:>8.2f} {r['seconds']:>8.2f}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """Validity per task (rows) and strategy (columns), with the achieved tokens per full pass."""
    labels = list(result["validity"]["all"])
    tpp = {r["label"]: r["tokens_per_full_pass"] for r in result["results"] if r["task"] == "all"}
    lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task, row in result["validity"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[label]:.3f}" for label in labels) + " |")
    lines.append("| tokens / full pass | " + " | ".join(f"{tpp[label]:.2f}" for label in labels) + " |")
    n, held = result["prompts"], result.get("held_out")  # reports before `held_out` held eval prompts only
    if held is None or held == n:
        counts = "held-out prompts per task: " + ", ".join(f"{t} {k}" for t, k in n.items())
    else:
        counts = "prompts per task: " + ", ".join(f"{t} {k} ({held[t]} held out)" for t, k in n.items())
    lines += ["", "Validity = fraction of valid answers; " + counts + f"; {result['num_samples']} answer(s) each, "
              f"gen length {result['gen_length']}, T = {result['sampling']['temperature']}, "
              f"order {result['sampling']['order']}, seed {result['seed']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """One panel per task: validity against tokens per full pass; fixed-K families start at exact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    tasks = list(result["validity"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in result["results"] if r["task"] == task]
        exact = next((r for r in rows if r["strategy"] == "exact"), None)
        families: dict[str, list] = {}
        for r in rows:
            if r["strategy"] != "exact":
                families.setdefault(r["strategy"], []).append(r)
        for name, rs in families.items():
            pts = sorted((r["tokens_per_full_pass"], r["valid"]) for r in rs)
            if exact is not None and name in ("parallel", "adjust"):
                pts = [(1.0, exact["valid"])] + pts
            ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=name)
        if exact is not None:
            ax.scatter([1.0], [exact["valid"]], marker="*", s=160, color="black", zorder=5, label="exact")
        ax.set_title(task)
        ax.set_xlabel("tokens per full pass")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validity")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{result.get('base', '')}: verifiable tasks, validity vs tokens per full pass", fontsize=10)
    save_figure(fig, path)


def select_records(records: list[dict], tasks=None, limit: int = 0) -> list[dict]:
    """The records of the given tasks (None: all), at most `limit` per task (0: no limit), in file order."""
    if tasks:
        keep = set(_tasks_arg(tasks))
        records = [r for r in records if r["task"] in keep]
    if limit:
        kept, seen = [], {}
        for r in records:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            if seen[r["task"]] <= limit:
                kept.append(r)
        records = kept
    return records


def write_report(result: dict, out_dir) -> dict:
    """tasks.json, tasks.md and tasks.png in `out_dir`; returns their paths."""
    from .report import write_report as write

    return write(result, out_dir, "tasks", markdown_table, plot)


# --- command line (`python -m adjust.eval.tasks`: data files; `adjust eval tasks` lives in cli.py) ---
def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adjust.eval.tasks", description="write task data files")
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="training documents (JSONL, one example each)")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, required=True, help="examples in all, tasks interleaved")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    q = sub.add_parser("prompts", help="task prompts (JSONL {task, prompt, meta})")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, required=True, help="prompts per task")
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--split", default="eval", choices=["eval", "train"])
    q.add_argument("--tasks", default=None)
    o = sub.add_parser("overlap", help="held-out prompts whose item set occurs in training data (JSON)")
    o.add_argument("--prompts", required=True, help="held-out prompts (.jsonl from `prompts`)")
    o.add_argument("--train", required=True, help="training data (.jsonl from `data`)")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if getattr(args, "tasks", None) else None
    try:
        if args.what == "overlap":
            from ..provenance import code_version

            report = {**heldout_overlap_files(args.prompts, args.train), "prompts_file": args.prompts,
                      "train_file": args.train, "code_version": code_version()}
            print(json.dumps(report, indent=1))
            return 0
        if args.what == "data":
            n = write_task_data(args.out, args.n, args.seed, tasks)
        else:
            n = write_task_prompts(args.out, args.n, args.seed, tasks, args.split)
    except AdjustError as e:
        print(f"adjust: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} records to {args.out}")
    return 0


# --- how held out are the held-out prompts ------------------------------------------------------
def heldout_overlap(eval_prompts, train_prompts) -> dict:
    """Held-out prompts whose item set (as a set) occurs in training data, per task.

    The split holds out a (task, item set) pair, so an item set held out for one task can
    still be trained on under another: `list`, `shuffle` and `reverse` draw from the same common words.
    eval_prompts / train_prompts: prompt strings or records with a "prompt". Returns
    {task: {"prompts", "item_sets_in_training", "by_training_task": {task: count}}}, counting
    each held-out prompt once under "item_sets_in_training".
    """
    def prompt_of(r):
        return r if isinstance(r, str) else r["prompt"]

    seen: dict[frozenset, set] = {}
    for r in train_prompts:
        task, items = parse_prompt(prompt_of(r))
        seen.setdefault(frozenset(items), set()).add(task)
    out: dict[str, dict] = {}
    for r in eval_prompts:
        task, items = parse_prompt(prompt_of(r))
        row = out.setdefault(task, {"prompts": 0, "item_sets_in_training": 0, "by_training_task": {}})
        row["prompts"] += 1
        found = seen.get(frozenset(items), set())
        row["item_sets_in_training"] += bool(found)
        for t in sorted(found):
            row["by_training_task"][t] = row["by_training_task"].get(t, 0) + 1
    return out


def heldout_overlap_files(prompts_jsonl, train_jsonl) -> dict:
    """`heldout_overlap` of a prompts file (from `prompts`) and a training file (from `data`)."""
    from ..data import read_prompt_file

    return heldout_overlap(read_prompt_file(prompts_jsonl), read_prompt_file(train_jsonl))


if __name__ == "__main__":
    sys.exit(main())
