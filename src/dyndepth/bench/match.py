"""`dyndepth match CONFIG --against dense,moe,huginn,moeut,mor`: baselines matched jointly in parameters, FLOPs per
token and training memory to a reference model (Dreamer's methodological claim, ../shared/papers/dreamer.md §3).

What is matched, for the reference and every candidate:
- parameters: trainable parameters, tied embeddings once (analytic: `num_params()` of the config, or the model built
  on the meta device);
- FLOPs per token: the forward at `seq_len` with causal attention, core/flops.py (`model.forward_flops(T) / T`);
  recurrent models at their evaluation depth, Mixture-of-Recursions at its nominal capacity;
- memory: one training step (the trainer's own step, AdamW, float32) at `batch_size` x `seq_len`. On CUDA the peak
  of `torch.cuda.max_memory_allocated` over the step; on CPU the bytes the step holds: parameters, gradients, AdamW
  state and the activations autograd saves for backward, counted by storage (`bench.dreamer._cpu_step_bytes`). The
  CPU figure leaves out transient buffers, so it is a lower bound of the peak, measured the same way for every
  model. Huginn is measured at its mean draw (mean_recurrence - mean_backprop_depth steps without grad, then
  mean_backprop_depth with grad).

Search, per family: a grid of discrete shapes (width D, attention heads, depth, experts; `family_grid`); for
each, the one width that scales FLOPs linearly (MLP or expert width) is solved so FLOPs/token equal the
reference's (widths below `min_width` are not allowed); shapes whose parameters are within tolerance are kept;
memory is measured on a spread of them, a linear model of memory in (parameters, applications x D, applications x
width) is fitted, the best predicted ones are measured, and the shape with the smallest largest mismatch wins.
Families that cannot meet the tolerance are reported with their residual mismatch, never hidden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import dyndepth
from dyndepth.bench.timing import check_bench_config, machine_description, markdown_table
from dyndepth.core import flops
from dyndepth.models import build_config, build_model
from dyndepth.models.huginn import forward_flops_for, split_steps
from dyndepth.models.moeut import moeut_config
from dyndepth.models.mor import nominal_forward_flops

FAMILIES = ("dense", "moe", "huginn", "moeut", "mor")
SHARED = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
          "rope_theta", "rms_norm_eps", "tie_word_embeddings")


@dataclass
class MatchConfig:
    reference: str = "dreamer-tiny"  # a preset, a recipe (.toml / .yaml) or a checkpoint folder
    against: list[str] = field(default_factory=lambda: list(FAMILIES))
    batch_size: int | None = None  # None: the reference recipe's train.batch_size, else 8
    seq_len: int | None = None  # None: the reference recipe's train.seq_len, else 256
    tolerance: float = 0.05  # largest relative mismatch allowed in each of parameters, FLOPs, memory
    max_measured: int = 12  # memory measurements per family and round (two rounds)
    device: str = "cpu"
    out_dir: str = "runs/match"
    switchhead: int = 0  # MoEUT candidates with SwitchHead attention, this many experts per head (0: standard)

    def __post_init__(self) -> None:
        unknown = [f for f in self.against if f not in FAMILIES]
        if unknown:
            raise ValueError(f"match --against: {', '.join(map(repr, unknown))} is not a baseline family; families: "
                             f"{', '.join(FAMILIES)}.")
        if not self.against:
            raise ValueError("match --against needs at least one family.")
        recipe_train = _recipe_section(self.reference, "train")  # a baseline trains at its reference's shape
        if self.batch_size is None:
            self.batch_size = int(recipe_train.get("batch_size", 8))
        if self.seq_len is None:
            self.seq_len = int(recipe_train.get("seq_len", 256))
        if self.switchhead == 1 or self.switchhead < 0:
            raise ValueError(f"match switchhead must be 0 (off) or >= 2 experts per head, got {self.switchhead}.")
        for name in ("batch_size", "seq_len", "max_measured"):
            if getattr(self, name) < 1:
                raise ValueError(f"match {name} must be >= 1, got {getattr(self, name)}.")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"match tolerance must be in (0, 1), got {self.tolerance}.")
        check_bench_config(self, "match")  # "auto" names the device that measures (a bad one fails here)


def _recipe_section(reference: str, name: str) -> dict:
    """Section `name` of the reference when it is a recipe file, as written; {} otherwise."""
    path = Path(reference)
    if not (path.is_file() and path.suffix in (".toml", ".yaml", ".yml", ".json")):
        return {}
    from dyndepth.runconfig import read_recipe

    section = read_recipe(path).get(name)
    return dict(section) if isinstance(section, dict) else {}


# ------------------------------------------------------------------------------------------- analytic counts
def train_flops_per_token(config, T: int) -> float:
    """Training FLOPs per token at sequence length T, one convention for every family (reported, not matched): the
    forward plus a backward of twice the forward of what takes gradients, causal attention; a sampling recurrent
    model averaged over its training draws (E[steps] = mean + 1: a Huginn matched at its evaluation depth trains
    ~16% more per token than a reference without sampling)."""
    if config.model_type in ("huginn", "dreamer"):
        return build_model(config).train_flops_per_token(T)
    return 3 * flops_per_token(config, T)


def flops_per_token(config, T: int) -> float:
    """Forward FLOPs per token at sequence length T (core/flops.py), at the evaluation depth."""
    if config.model_type == "dreamer":
        return flops.recurrent_forward_flops(config, T) / T
    if config.model_type == "huginn":
        return forward_flops_for(config, T) / T
    if config.model_type == "mor":  # at its nominal capacity (training top-k)
        return nominal_forward_flops(config, T) / T
    return flops.forward_flops(config, T) / T


def num_params(config) -> int:
    if hasattr(config, "num_params"):
        return config.num_params()
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def applications(config) -> int:
    """Layer applications of an evaluation forward."""
    return config.num_hidden_layers


def mlp_width(config) -> int:
    """Per-token MLP width that runs (dense F, or k x expert width)."""
    if getattr(config, "num_experts", 0):
        return config.num_experts_per_tok * config.moe_intermediate_size
    return config.intermediate_size


# ------------------------------------------------------------------------------------------- the search space
def _widths(D: int) -> list[int]:
    step = max(8, D // 16)
    lo, hi = max(32, D // 2), 2 * D
    return list(range(lo - lo % step or step, hi + 1, step))


def _heads(ref) -> list[dict]:
    """Attention widths to try: half, the same and twice the reference's query heads (head_dim and the query /
    kv-head ratio kept), since attention sets how FLOPs per token relate to parameters at a sequence length."""
    N, G = ref.num_attention_heads, ref.num_key_value_heads
    out = []
    for n in sorted({max(1, N // 2), N, 2 * N}):
        g = max(1, n * G // N)
        if n % g == 0:
            out.append({"num_attention_heads": n, "num_key_value_heads": g})
    return out


def family_grid(family: str, ref, switchhead: int = 0) -> tuple[list[dict], str]:
    """Candidate field dicts of a family (everything but the solved width) and the width field to solve;
    `switchhead` E > 0 gives MoEUT candidates SwitchHead attention (E experts per head, 2 per token)."""
    base = {k: getattr(ref, k) for k in SHARED if hasattr(ref, k)}
    if base.get("head_dim") is None:
        base["head_dim"] = ref.hidden_size // ref.num_attention_heads
    A, k = applications(ref), getattr(ref, "num_experts_per_tok", 2) if getattr(ref, "num_experts", 0) else 2
    experts = [e for e in (4, 8, 16, 32, 64, 128) if e >= 2 * k]
    out = []
    for D, base in ((D, {**base, **heads}) for D in _widths(ref.hidden_size) for heads in _heads(ref)):
        if family == "dense":
            out += [{**base, "model_type": "qwen3", "hidden_size": D, "num_hidden_layers": L, "intermediate_size": 1}
                    for L in range(1, 2 * A + 3)]
        elif family == "moe":
            out += [{**base, "model_type": "qwen3_moe", "hidden_size": D, "num_hidden_layers": L, "num_experts": E,
                     "num_experts_per_tok": k, "intermediate_size": 1, "moe_intermediate_size": 1}
                    for L in range(1, 2 * A + 3) for E in experts]
        elif family == "huginn":
            for P, C, K in ((2, 4, 2), (1, 2, 1)):
                out += [{**base, "model_type": "huginn", "hidden_size": D, "n_layers_in_prelude": P,
                         "n_layers_in_recurrent_block": C, "n_layers_in_coda": K, "mean_recurrence": r,
                         "mean_backprop_depth": b, "intermediate_size": 1}
                        for r in range(1, max(2, (2 * A) // C) + 1) for b in sorted({max(1, r // 4), r})]
        elif family == "moeut":
            sh = {"attn_num_experts": switchhead, "attn_experts_per_tok": 2} if switchhead else {}
            out += [{**base, **sh, "model_type": "dreamer", "hidden_size": D, "num_recurrences": R, "num_experts": E,
                     "num_experts_per_tok": k, "moe_intermediate_size": 1}
                    for R in range(1, A + 2) for E in experts]
        elif family == "mor":  # middle-cycle: one unshared layer first and last, expert-choice at 3 capacities
            out += [{**base, "model_type": "mor", "hidden_size": D, "n_layers_in_recursion": C, "num_recursions": R,
                     "capacity": cap, "intermediate_size": 1} for C in range(1, A + 1) for R in (2, 3, 4)
                    for cap in (None, [1.0] * R, [1.0] + [0.5] * (R - 1))]
    width = "moe_intermediate_size" if family in ("moe", "moeut") else "intermediate_size"
    return out, width


def config_of(fields: dict):
    """The config a candidate field dict describes (MoEUT candidates through `moeut_config`)."""
    if fields.get("model_type") == "dreamer":
        return moeut_config(**{k: v for k, v in fields.items() if k != "model_type"})
    return build_config(fields)


def solve_width(fields: dict, width: str, target: float, T: int) -> dict | None:
    """`fields` with `width` set so FLOPs/token equal `target` (FLOPs are linear in the width); None when that
    width is below `min_width`."""
    f1 = flops_per_token(config_of({**fields, width: 1}), T)
    f2 = flops_per_token(config_of({**fields, width: 2}), T)
    w = 1 + (target - f1) / (f2 - f1)
    step = 4 if width == "moe_intermediate_size" else 1  # grouped expert matmuls need 16-byte strides
    w = round(w / step) * step
    return {**fields, width: w} if w >= min_width(fields, width) else None


def min_width(fields: dict, width: str) -> int:
    """The narrowest MLP a baseline may get (so no family "matches" by dropping its MLP): half the model width
    for a dense MLP, 16 for an expert."""
    return 16 if width == "moe_intermediate_size" else max(1, fields["hidden_size"] // 2)


# ------------------------------------------------------------------------------------------- memory
def measure_memory(config, batch_size: int, seq_len: int, device: str = "cpu") -> int:
    """Bytes of one training step (see the module docstring): CUDA peak, or CPU bytes held."""
    from dyndepth.bench.dreamer import _cpu_step_bytes
    from dyndepth.bench.train import ours_loop, random_batches
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train import parallel

    dev = parallel.resolve_device(device)
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    model = build_model(config)
    if config.model_type == "huginn":  # the mean draw, not a random one
        s = config.mean_backprop_depth
        model.draw_steps = lambda: (max(config.mean_recurrence - s, 0), min(s, config.mean_recurrence))
    elif getattr(config, "sample_recurrence", False):  # a sampling Dreamer too (its first draw is 14 steps at mean 4)
        model.training_steps = lambda: split_steps(config.num_recurrences, config.backprop_depth)
    tcfg = TrainConfig(steps=2, batch_size=batch_size, seq_len=seq_len, schedule="constant", warmup=0,
                       device=device, progress=False, plot=False)
    shape = dataclasses.make_dataclass("Shape", [("batch_size", int), ("seq_len", int)])(batch_size, seq_len)
    batches = random_batches(config.vocab_size, shape, 1, dev)
    loop = ours_loop(model.to(dev), batches, tcfg, dev, model.trainer_hooks(2))
    if dev.type == "cuda":
        loop.step()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    return _cpu_step_bytes(loop)


def _features(config) -> list[float]:
    A = applications(config)
    return [1.0, float(num_params(config)), float(A * config.hidden_size), float(A * mlp_width(config))]


def _mismatch(row: dict, ref: dict) -> dict:
    return {k: row[k] / ref[k] - 1 for k in ("params", "flops", "memory") if row.get(k) is not None}


def _worst(row: dict, ref: dict) -> float:
    return max(abs(v) for v in _mismatch(row, ref).values())


def search_family(family: str, ref_config, ref: dict, cfg: MatchConfig) -> dict:
    """The matched baseline of one family: its config and counts, the residual mismatch, and what was searched."""
    grid, width = family_grid(family, ref_config, cfg.switchhead)
    rows = []
    for fields in grid:
        solved = solve_width(fields, width, ref["flops"], cfg.seq_len)
        if solved is None:
            continue
        config = config_of(solved)
        rows.append({"config": config, "params": num_params(config), "flops": flops_per_token(config, cfg.seq_len)})
    if not rows:
        raise ValueError(f"match: no {family} shape reaches the reference's FLOPs per token.")
    kept = [r for r in rows if max(abs(v) for v in _mismatch(r, ref).values()) <= cfg.tolerance]
    pool = kept or sorted(rows, key=lambda r: _worst(r, ref))[:cfg.max_measured]
    pool.sort(key=lambda r: _features(r["config"])[2:])
    n = min(cfg.max_measured, len(pool))
    first = [pool[round(i * (len(pool) - 1) / max(n - 1, 1))] for i in range(n)]
    measured = {id(r): r for r in first}
    for r in measured.values():
        r["memory"] = measure_memory(r["config"], cfg.batch_size, cfg.seq_len, cfg.device)
    if len(measured) >= 4 and len(pool) > len(measured):  # second round: the best under a fitted memory model
        X = torch.tensor([_features(r["config"]) for r in measured.values()], dtype=torch.float64)
        y = torch.tensor([float(r["memory"]) for r in measured.values()], dtype=torch.float64)
        coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
        for r in pool:
            r["predicted"] = float(torch.tensor(_features(r["config"]), dtype=torch.float64) @ coef)
        rest = sorted((r for r in pool if id(r) not in measured),
                      key=lambda r: max(_worst(r, ref), abs(r["predicted"] / ref["memory"] - 1)))
        for r in rest[:cfg.max_measured]:
            r["memory"] = measure_memory(r["config"], cfg.batch_size, cfg.seq_len, cfg.device)
            measured[id(r)] = r
    best = min(measured.values(), key=lambda r: _worst(r, ref))
    return {"family": family, "config": best["config"], "params": best["params"], "flops": best["flops"],
            "train_flops": train_flops_per_token(best["config"], cfg.seq_len),
            "memory": best["memory"], "mismatch": _mismatch(best, ref), "within": _worst(best, ref) <= cfg.tolerance,
            "shapes": len(rows), "kept": len(kept), "measured": len(measured)}


# ------------------------------------------------------------------------------------------- entry points
def load_reference(name: str):
    """The reference config: a preset name, a recipe file's model section, or a checkpoint folder."""
    if name in dyndepth.PRESETS:
        return dyndepth.preset(name)
    path = Path(name)
    if path.is_dir():
        model = dyndepth.from_pretrained(path)
        _check_plain(name, model)
        return model.config
    if path.is_file():
        from dyndepth.runconfig import load_run_config
        from dyndepth.train.run import build_model as build_from_recipe

        run = load_run_config(path)
        model = build_from_recipe(run.model)
        _check_plain(name, model, run.method.get("name"))
        return model.config
    raise ValueError(f"match reference {name!r} is neither a preset, a recipe file nor a checkpoint folder; presets: "
                     f"{sorted(dyndepth.PRESETS)}.")


def _check_plain(name: str, model, method: str | None = None) -> None:
    """Parameters, FLOPs and memory are counted for the model family alone: a method's routers, gates and extra
    passes would be left out, and its baselines matched to the plain decoder. (MoR's routing is its family's own.)"""
    attached = getattr(model.method, "name", None)
    method = method or (attached if attached != model.config.model_type else None)
    if method not in (None, "none"):
        raise ValueError(f"match reference {name} carries the method {method!r}, which match does not count (its "
                         "routers, gates, extra passes): the baselines would match the plain decoder. Pass the "
                         "model without the method.")


def run_match(cfg: MatchConfig) -> dict:
    ref_config = load_reference(cfg.reference)
    ref = {"params": num_params(ref_config), "flops": flops_per_token(ref_config, cfg.seq_len),
           "train_flops": train_flops_per_token(ref_config, cfg.seq_len),
           "memory": measure_memory(ref_config, cfg.batch_size, cfg.seq_len, cfg.device)}
    results = [search_family(f, ref_config, ref, cfg) for f in cfg.against]
    return {"config": dataclasses.asdict(cfg), "machine": machine_description(torch.device(cfg.device)),
            "reference": {"config": ref_config, **ref}, "baselines": results}


def describe(config) -> str:
    """One line: the shape of a model (width, heads, depth, experts, widths)."""
    heads = f"N={config.num_attention_heads}/{config.num_key_value_heads}"
    return _describe(config).replace(", ", f", {heads}, ", 1)


def _describe(config) -> str:
    c = config
    if c.model_type == "huginn":  # without the sampler every step takes gradients, whatever mean_backprop_depth says
        backprop = (c.mean_backprop_depth or "all") if c.sample_recurrence else "all"
        return (f"D={c.hidden_size}, {c.n_layers_in_prelude}/{c.n_layers_in_recurrent_block}/{c.n_layers_in_coda} x "
                f"r={c.mean_recurrence} (backprop {backprop}), F={c.intermediate_size}")
    if c.model_type == "dreamer":
        what = "E={},k={},F={}".format(c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) \
            if c.num_experts else f"F={c.intermediate_size}"
        sh = f", SwitchHead E={c.attn_num_experts},k={c.attn_experts_per_tok}" if c.attn_num_experts else ""
        return f"D={c.hidden_size}, G={c.layers_per_group} x R={c.num_recurrences}, DA {c.da_mode}{sh}, {what}"
    if c.model_type == "mor":
        return (f"D={c.hidden_size}, {c.n_layers_first} + {c.n_layers_in_recursion} x R={c.num_recursions} + "
                f"{c.n_layers_last}, {c.router_type}-choice "
                f"capacity {'/'.join(f'{x:.2f}' for x in c.capacity)}, F={c.intermediate_size}")
    if c.num_experts:
        return (f"D={c.hidden_size}, L={c.num_hidden_layers}, E={c.num_experts}, k={c.num_experts_per_tok}, "
                f"F={c.moe_intermediate_size}")
    return f"D={c.hidden_size}, L={c.num_hidden_layers}, F={c.intermediate_size}"


def render(result: dict) -> str:
    ref, c = result["reference"], result["config"]
    rows = [{"model": f"reference ({c['reference']})", "shape": describe(ref["config"]),
             "params (M)": f"{ref['params'] / 1e6:.3f}", "FLOPs/token (M)": f"{ref['flops'] / 1e6:.3f}",
             "memory (MiB)": f"{ref['memory'] / 2**20:.1f}", "d params": "", "d FLOPs": "", "d memory": "",
             "within": "", "d train FLOPs (not matched)": ""}]
    for b in result["baselines"]:
        m = b["mismatch"]
        rows.append({"model": b["family"], "shape": describe(b["config"]), "params (M)": f"{b['params'] / 1e6:.3f}",
                     "FLOPs/token (M)": f"{b['flops'] / 1e6:.3f}", "memory (MiB)": f"{b['memory'] / 2**20:.1f}",
                     "d params": f"{m['params']:+.1%}", "d FLOPs": f"{m['flops']:+.1%}",
                     "d memory": f"{m['memory']:+.1%}", "within": "yes" if b["within"] else "NO",
                     "d train FLOPs (not matched)": f"{b['train_flops'] / ref['train_flops'] - 1:+.1%}"})
    cols = list(rows[0])
    kind = "CUDA peak" if c["device"].startswith("cuda") else "CPU bytes held by one step"
    return (f"### match: {c['reference']} at batch {c['batch_size']} x seq {c['seq_len']}, tolerance "
            f"{c['tolerance']:.0%}, memory = {kind}; {result['machine']}\n\n" + markdown_table(rows, cols))


def recipe(config, cfg: MatchConfig, family: str) -> dict:
    """A baseline's recipe: its matched model; with a recipe file as the reference, that recipe's own [train], [data]
    and [eval] (so the baseline trains as the reference does), at the matched batch and length, into an out_dir of
    its own."""
    fields = {k: v for k, v in config.to_dict().items() if v is not None and k not in ("model_type", "torch_dtype")}
    sections = {k: v for k in ("data", "eval") if (v := _recipe_section(cfg.reference, k))}
    train = {**_recipe_section(cfg.reference, "train"), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}
    if "out_dir" in train:
        train["out_dir"] = f"{train['out_dir']}-{family}"
    return {"model": {"type": config.model_type, **fields}, "train": train, **sections}


def main(cfg: MatchConfig) -> dict:
    result = run_match(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for b in result["baselines"]:
        path = out / f"{b['family']}.yaml"
        path.write_text(yaml.safe_dump(recipe(b["config"], cfg, b["family"]), sort_keys=False))
        b["recipe"] = str(path)
    table = render(result)
    (out / "match.md").write_text(table + "\n")
    print(table)
    return result
