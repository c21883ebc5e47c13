"""`dyndepth bench dreamer`: Dreamer against a dense decoder of equal FLOPs per token, in one run.

- The dense decoder has one layer per Dreamer layer application (R x layers_per_group), the same width, heads
  and vocabulary, and an MLP width chosen so its FLOPs per token equal Dreamer's at the benchmark's sequence
  length: the MLP takes what depth attention (averaged over steps) and sparse expert attention cost
  (`matched_dense`). Both report their analytic FLOPs per token; the residual mismatch is in the table.
- Training: one optimizer step each (the trainer's own step, `bench.train.ours_loop`, Dreamer with its
  balancing hook), alternated step by step; tokens/s from the median step time. The dense step is timed a
  second time as a third contender (`control`): the ratio of the two is the run's timing noise.
- Memory: CUDA peak of one step (less what the other model holds); on CPU, the bytes a step holds: parameters,
  gradients, AdamW state and the activations autograd saves for backward (counted by storage).
- Decode: the n - 1 greedy cached steps `generate` runs after an untimed prefill, at each batch size, the two
  models' steps alternated step by step; tokens/s from the median step. A second dense stepper (a cache of its
  own) is timed alongside as the decode rows' `control`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

import dyndepth
from dyndepth.bench import timing
from dyndepth.bench.train import Loop, _peak_memory, ours_loop, random_batches
from dyndepth.config import ModelConfig
from dyndepth.core.cache import KVCache
from dyndepth.core.flops import depth_attn_flops, expert_attn_flops, kv_flops, q_o_flops
from dyndepth.models.dreamer import DreamerConfig
from dyndepth.runconfig import DTYPES, TrainConfig
from dyndepth.train import parallel


@dataclass
class DreamerBenchConfig:
    model: str = "dreamer-bench"  # a Dreamer preset (random weights)
    batch_size: int = 8  # training batch
    seq_len: int = 256
    steps: int = 5  # timed training steps per model
    warmup_steps: int = 2
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_len: int = 32
    new_tokens: int = 16
    repeats: int = 3  # timed rounds per decode measurement
    dtype: str = "float32"  # float32 | bfloat16 (training: autocast; decode: weights in this dtype)
    device: str = "cpu"
    # Compile both models: training per layer, as the trainer's `compile` does, and the decode steps over a full
    # static cache, as `generate(compile=True)` runs them
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("eager" only traces: for tests)
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        preset = dyndepth.PRESETS.get(self.model, {})
        if preset.get("model_type") != "dreamer":
            dreamers = sorted(k for k, v in dyndepth.PRESETS.items() if v.get("model_type") == "dreamer")
            raise ValueError(f"bench dreamer model {self.model!r} is not a Dreamer preset; use one of {dreamers}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench dreamer dtype {self.dtype!r} is not one of {DTYPES}.")
        for name in ("batch_size", "seq_len", "steps", "repeats", "prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench dreamer {name} must be >= 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:  # a negative count timed fewer rounds, none at all with steps = 1
            raise ValueError(f"bench dreamer warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.new_tokens < 2 or not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError("bench dreamer needs new_tokens >= 2 and decode batch sizes >= 1.")
        limit = preset.get("max_position_embeddings", DreamerConfig.max_position_embeddings)
        if max(self.seq_len, self.prompt_len + self.new_tokens) > limit:
            raise ValueError(f"bench dreamer seq_len ({self.seq_len}) and prompt_len + new_tokens ({self.prompt_len} + "
                             f"{self.new_tokens}) must fit {self.model}'s max_position_embeddings ({limit}).")


# The dense MLP width is a multiple of 16, as real models' widths are: an odd width (878 at dreamer-bench) ran this
# CPU's matmuls 20% slower than 880 (65 against 81 GFLOP/s, measured), which handicapped the baseline.
ALIGN = 16


def matched_dense(config: DreamerConfig) -> ModelConfig:
    """A Qwen3-shaped decoder of equal FLOPs per token: one layer per application, attention of the same heads, and
    an MLP as costly as depth plus expert attention (DA averaged over the steps) plus what SwitchHead's attention
    experts and routers cost over plain projections (MoEUT presets), its width rounded to `ALIGN`."""
    R, D = config.num_recurrences, config.hidden_size
    dense = ModelConfig(model_type="qwen3", vocab_size=config.vocab_size, hidden_size=D, intermediate_size=ALIGN,
                        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
                        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings)
    attention = q_o_flops(config) + kv_flops(config) - (q_o_flops(dense) + kv_flops(dense))  # 0 without SwitchHead
    extra = sum(depth_attn_flops(config, r) for r in range(R)) / R + expert_attn_flops(config) + attention
    return replace(dense, intermediate_size=ALIGN * max(1, round(extra / (6 * D * ALIGN))))


def _cpu_step_bytes(loop: Loop) -> int:
    """Bytes one training step holds on CPU: parameters, gradients, AdamW state, and the activations autograd
    saves for backward (distinct storages that are not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in loop.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loop.step()
    state = [p for p in loop.model.parameters()] + [p.grad for p in loop.model.parameters() if p.grad is not None]
    state += [v for s in loop.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in state) + sum(saved.values())


def _models(cfg: DreamerBenchConfig) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dreamer = dyndepth.build_model(dyndepth.preset(cfg.model))
    dense = dyndepth.build_model(matched_dense(dreamer.config))
    return {"dreamer": dreamer, "dense": dense}


def run_dreamer_bench(cfg: DreamerBenchConfig) -> dict:
    device = parallel.resolve_device(cfg.device)
    models = _models(cfg)
    flops = {k: m.forward_flops(cfg.seq_len) / cfg.seq_len for k, m in models.items()}
    params = {k: m.num_params() for k, m in models.items()}
    tcfg = TrainConfig(steps=cfg.warmup_steps + cfg.steps + 2, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       schedule="constant", warmup=0, dtype=cfg.dtype, device=cfg.device, compile=cfg.compile,
                       progress=False, plot=False)
    batches = random_batches(models["dense"].config.vocab_size, cfg, cfg.warmup_steps + cfg.steps + 2, device)
    loops = {k: ours_loop(copy.deepcopy(m), batches, tcfg, device, m.trainer_hooks(tcfg.steps)
                          if hasattr(m, "trainer_hooks") else []) for k, m in models.items()}
    fns = {k: v.step for k, v in loops.items()}
    fns[timing.CONTROL] = loops["dense"].step  # the dense step once more: how far two identical contenders read apart
    step_s = timing.interleaved_median(fns, device, repeats=cfg.steps, warmup=cfg.warmup_steps)
    control = step_s.pop(timing.CONTROL)
    memory = _peak_memory(loops, device)
    if memory is None:
        memory = {k: _cpu_step_bytes(loop) for k, loop in loops.items()}
    tokens = cfg.batch_size * cfg.seq_len
    train_tps = {k: tokens / t for k, t in step_s.items()}

    dtype = dyndepth.interop.hf.DTYPES[cfg.dtype]
    decode, decode_control, steps = {}, {}, cfg.new_tokens - 1
    inference = {name: copy.deepcopy(model).to(device=device, dtype=dtype).eval() for name, model in models.items()}
    for B in cfg.decode_batches:
        prompt = torch.randint(0, models["dense"].config.vocab_size, (B, cfg.prompt_len), device=device)
        steppers = {name: timing.greedy_stepper(m, prompt, steps, compile=timing.decode_compile(m, cfg))
                    for name, m in {**inference, timing.CONTROL: inference["dense"]}.items()}  # the dense once more
        with timing.compiled_decoding(cfg.compile):
            t = timing.interleaved_steps(steppers, steps, device, rounds=cfg.repeats)
        decode[B] = {name: B / t[name] for name in models}
        decode_control[B] = t["dense"] / t[timing.CONTROL]  # 1 +- this batch size's timing noise
    kv = {k: KVCache.for_model(m.config, 1, 1, num_slots=m.num_slots(), dtype=dtype).nbytes_per_token()
          for k, m in models.items()}
    return {
        "config": asdict(cfg), "device": device.type, "machine": timing.machine_description(device),
        "dreamer_config": models["dreamer"].config.to_dict(), "dense_config": models["dense"].config.to_dict(),
        "params": params, "flops_per_token": flops, "flops_ratio": flops["dreamer"] / flops["dense"],
        "train_step_seconds": step_s, "train_tokens_per_s": train_tps,
        "train_ratio": train_tps["dreamer"] / train_tps["dense"], "train_control": step_s["dense"] / control,
        "memory_bytes": memory, "memory_kind": "cuda peak" if device.type == "cuda" else "cpu step bytes",
        "memory_ratio": memory["dreamer"] / memory["dense"],
        "decode_tokens_per_s": decode, "decode_control": decode_control, "kv_bytes_per_token": kv,
    }


def render_markdown(r: dict) -> str:
    c, d = r["config"], r["dreamer_config"]
    rows = [
        {"metric": "parameters (M)", "dreamer": r["params"]["dreamer"] / 1e6, "dense": r["params"]["dense"] / 1e6,
         "ratio": r["params"]["dreamer"] / r["params"]["dense"]},
        {"metric": f"forward FLOPs/token (T={c['seq_len']})", "dreamer": r["flops_per_token"]["dreamer"],
         "dense": r["flops_per_token"]["dense"], "ratio": r["flops_ratio"]},
        {"metric": f"train tok/s (B={c['batch_size']}, T={c['seq_len']})", "dreamer": r["train_tokens_per_s"][
            "dreamer"], "dense": r["train_tokens_per_s"]["dense"], "ratio": r["train_ratio"],
         "control": r["train_control"]},
        {"metric": f"train memory (MiB, {r['memory_kind']})", "dreamer": r["memory_bytes"]["dreamer"] / 2**20,
         "dense": r["memory_bytes"]["dense"] / 2**20, "ratio": r["memory_ratio"]},
    ]
    for B, tps in r["decode_tokens_per_s"].items():
        rows.append({"metric": f"decode tok/s (B={B}, prompt {c['prompt_len']})", "dreamer": tps["dreamer"],
                     "dense": tps["dense"], "ratio": tps["dreamer"] / tps["dense"], "control": r["decode_control"][B]})
    kv = r["kv_bytes_per_token"]
    rows.append({"metric": "KV cache bytes/token", "dreamer": kv["dreamer"], "dense": kv["dense"],
                 "ratio": kv["dreamer"] / kv["dense"]})
    head = (f"### bench dreamer: {c['model']} (D={d['hidden_size']}, R={d['num_recurrences']}, E={d['num_experts']}, "
            f"k={d['num_experts_per_tok']}, F={d['moe_intermediate_size']}, DA {d['da_mode']}) vs a dense decoder "
            f"of {r['dense_config']['num_hidden_layers']} layers, MLP {r['dense_config']['intermediate_size']}; "
            f"{c['dtype']}, {r['machine']}; training {'compiled per layer' if c.get('compile') else 'eager'}, decode "
            f"{timing.decode_execution(c)}\n\n")
    tail = (f"\n\nratio = dreamer / dense. Training: median of {c['steps']} alternated optimizer steps after "
            f"{c['warmup_steps']} warm-up (trainer step, Dreamer with its balancing hook). Decode: median of "
            f"the {c['new_tokens'] - 1} greedy cached steps after the prompt, {c['repeats']} rounds, the models' steps "
            "alternated. control = the dense time / that of a second, identical dense contender timed alongside (its "
            "training step, its decode steps with a cache of their own): its distance from 1 is that row's timing "
            "noise.")
    return head + timing.markdown_table(rows, ["metric", "dreamer", "dense", "ratio", "control"]) + tail


def main(cfg: DreamerBenchConfig) -> dict:
    result = run_dreamer_bench(cfg)
    name = f"dreamer-{parallel.resolve_device(cfg.device).type}-{cfg.dtype}" + ("-compiled" if cfg.compile else "")
    return timing.publish(result, render_markdown(result), cfg.out_dir, name)
