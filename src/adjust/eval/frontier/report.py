"""The frontier's report: a Markdown table of every point, each batch size's fronts and dominance, and a plot
of quality against tokens/s with each family's Pareto front (written with frontier.json as one set)."""

from __future__ import annotations

from ..report import save_figure, write_report as write
from .analysis import points_at, side


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(result: dict) -> str:
    s = result["settings"]
    Bs = s["batch_sizes"]
    panels = result["panels"]
    q_title = "validity" if result["mode"] == "validity" else s["measure"]
    if result["mode"] == "validity":
        work = (f"{s['prompt_count']} task prompts ({', '.join(f'{t} {n}' for t, n in s['tasks'].items())}), "
                f"{s['num_samples']} answer(s) each")
    elif s["prompt_count"]:
        work = f"{s['prompt_count']} prompts, {s['num_samples']} sample(s) each"
    else:
        work = f"{s['num_samples']} unconditional samples"
    lines = [f"# Quality vs speed frontier: {s['base'].get('name')}", "",
             f"Quality: {q_title} on {work}, gen length {s['gen_length']}, T = {s['sampling']['temperature']}, "
             f"order {s['sampling']['order']}, seed {s['seed']}. Speed: median tokens/s of {s['repeats']} interleaved "
             f"repeats (shuffled order, {s['warmup']} warm-up), each run decoding "
             + (f"{len(s['timing_prompts'])} batch(es) of B unconditional samples, " if not s["prompt_count"] else
                f"{len(s['timing_prompts'])} prompt(s) as a batch of B samples each, ")
             + f"{s['threads']} thread(s), x exact = median paired ratio to {s['speed_reference']} in the same repeat.",
             ""]
    if result["mode"] == "text":
        lines += ["NLL: nats per generated token under the base's masked-diffusion bound (lower is not always "
                  "better: mode-seeking strategies can score below exact's own NLL)."
                  + ("" if s["measure"] == "nll" else f" Ranked by {s['measure']} against exact samples (seed "
                     f"{s['reference_seed']}); exact's own value is the noise floor."), ""]
    head = ["point", "family", "cache"]
    if result["mode"] == "validity":
        head += panels
    else:
        head += ["NLL"] + ([s["measure"]] if s["measure"] != "nll" else [])
    tb = str(s.get("target_batch_size", Bs[0]))
    head += ["tok/pass", f"tok/pass-eq B={tb}", f"rows/pass B={tb}", f"drafts acc/prop B={tb}"]
    head += [h for B in Bs for h in (f"tok/s B={B}", f"x exact B={B}")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["points"]:
        row = [p["label"], p["family"], p["cache"]]
        if result["mode"] == "validity":
            row += [_f(p["quality"][t]["value"]) for t in panels]
        else:
            row.append(_f(p.get("nll")) + ("" if p.get("nll_se") is None else f" ± {p['nll_se']:.3f}"))
            if s["measure"] != "nll":
                q = p["quality"]["text"]
                row.append(_f(q["value"]) + ("" if q["se"] is None else f" ± {q['se']:.3f}"))
        row.append(_f(p.get("tokens_per_full_pass"), 2))
        sp = p["speed"].get(tb, {})
        row += [_f(sp.get("tokens_per_pass_equivalent"), 2), _f(sp.get("rows_per_full_pass"), 2),
                f"{sp['drafts_accepted']:g}/{sp['drafts_proposed']:g}" if sp.get("drafts_proposed") else "-"]
        for B in Bs:
            sp = p["speed"][str(B)]
            row += [_f(sp["tokens_per_second"], 1), _f(sp["ratio_to_exact"], 2)]
        lines.append("| " + " | ".join(row) + " |")

    for B in Bs:
        lines += ["", f"## Fronts and dominance, batch {B}", ""]
        for panel in panels:
            a = result["analysis"][str(B)][panel]
            lines.append(f"**{panel}** overall front: {', '.join(a['overall'])}")
            lines.append("")
            for fam, labels in a["fronts"].items():
                lines.append(f"- {fam} front: {', '.join(labels)}")
            for d in a["dominance"]:
                if d["dominated_by"] is None:
                    lines.append(f"- peer {d['peer']} ({_f(d['quality'])}, {_f(d['tokens_per_second'], 1)} tok/s): "
                                 "no ADJUST-family point dominates it (a peer wins here)")
                else:
                    lines.append(f"- peer {d['peer']} ({_f(d['quality'])}, {_f(d['tokens_per_second'], 1)} tok/s): "
                                 f"dominated by {d['dominated_by']} ({_f(d['by_quality'])}, "
                                 f"{d['speed_ratio']:.2f}x its tokens/s; {d['dominators']} ADJUST-family point(s) dominate it)")
            lines.append("")
    m = result["machine"]
    lines += [f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, device {m['device']}"
              + (f" ({m['gpu']})" if m.get("gpu") else "") + f". Code version {result['code_version']}."]
    if s.get("pass_cost"):
        lines += [f"tok/pass-eq: tokens per pass-equivalent at batch {tb}; {s['pass_cost']['note']}; drafts "
                  "acc/prop: speculative's drafted writes accepted / proposed (medians over the timed repeats)."]
    lines += [f"Note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines) + "\n"


FAMILY_STYLE = {"exact": ("black", "*"), "parallel": ("tab:gray", "v"), "threshold": ("tab:orange", "s"),
                "factor": ("tab:brown", "D"), "entropy-bound": ("tab:purple", "P"), "adjust": ("tab:blue", "o"),
                "adjust-threshold": ("tab:green", "^"), "threshold-adjust": ("tab:red", "X"),
                "speculative": ("tab:cyan", "h")}


def plot(result: dict, path) -> None:
    """Quality (score) vs tokens/s at the target batch size; one panel per quality panel; each family's
    points as markers, its Pareto front as a line (peers dashed, ADJUST family solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = result["settings"]["target_batch_size"]
    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    s = result["settings"]
    if result["mode"] == "validity":
        ylabel = "validity"
    elif s["measure"] == "nll":
        ylabel = "-NLL under the base (nats/token; higher = better)"
    else:
        ylabel = f"{s['measure']} score (higher = closer to exact)"
    for ax, panel in zip(axes[0], panels):
        pts = points_at(result, panel, B)
        fronts = result["analysis"][str(B)][panel]["fronts"]
        by_label = {p["label"]: p for p in pts}
        for fam in dict.fromkeys(p["family"] for p in pts):
            color, marker = FAMILY_STYLE.get(fam, ("tab:cyan", "o"))
            fp = [p for p in pts if p["family"] == fam and p["q"] is not None]
            ax.scatter([p["s"] for p in fp], [p["q"] for p in fp], color=color, marker=marker,
                       s=110 if fam == "exact" else 30, zorder=4, label=fam, alpha=0.85)
            if fam in fronts:
                line = sorted((by_label[lab]["s"], by_label[lab]["q"]) for lab in fronts[fam])
                ax.plot(*zip(*line), color=color, linestyle="-" if side(fam) == "adjust" else "--", linewidth=1.2)
        ax.set_title(panel)
        ax.set_xlabel(f"tokens / s (batch {B}, {s['threads']} thread(s))")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{s['base'].get('name')}: quality vs speed, each family's Pareto front drawn "
                 "(solid: ADJUST family, dashed: peers)", fontsize=10)
    save_figure(fig, path)


def write_report(result: dict, out_dir) -> dict:
    """frontier.json, frontier.md and frontier.png in `out_dir`, written as one set; their paths."""
    return write(result, out_dir, "frontier", markdown_table, plot)
