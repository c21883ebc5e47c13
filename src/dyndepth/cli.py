"""The `dyndepth` command line: parsing only; every command calls one function usable from Python."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Token-adaptive depth for transformer language models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")
study_app = typer.Typer(no_args_is_help=True, help="Studies: several models trained and compared on the same data.")
app.add_typer(study_app, name="study")


def _version(value: bool) -> None:
    if value:
        import torch

        import dyndepth

        typer.echo(f"dyndepth {dyndepth.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version (and torch's) and exit.")) -> None:
    """Token-adaptive depth for transformer language models."""


def _fail(e: Exception) -> None:
    """Bad input ends with one clear line, not a stack trace (DYNDEPTH_DEBUG=1 shows the trace; 0, as unset, not)."""
    if os.environ.get("DYNDEPTH_DEBUG", "") not in ("", "0"):  # (DYNDEPTH_DEBUG=0 turned the trace on)
        raise e
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError, FloatingPointError) as e:
        _fail(e)


def _load_model(model: str, dtype: Optional[str], device: str):
    import dyndepth
    from dyndepth.devices import resolve_device, resolve_dtype
    from dyndepth.models import preset_model

    if model in dyndepth.PRESETS:  # random weights (smoke tests and demos), the same in every run
        return preset_model(model).to(resolve_device(device), resolve_dtype(dtype)).eval()
    return dyndepth.from_pretrained(model, dtype=dtype, device=device).eval()


def _interrupted(recipe: Path, overrides: list[str]) -> None:
    """Name the checkpoint an interrupted run keeps (its steps since then are lost) and the command that resumes it."""
    from tqdm import tqdm

    from dyndepth.runconfig import load_run_config
    from dyndepth.train.checkpoint import latest_checkpoint

    for bar in list(getattr(tqdm, "_instances", ())):  # the open progress bar ends its line (the message ran on after
        bar.close()  # it, and the bar was drawn again below it at exit)
    out_dir = load_run_config(recipe, overrides).train.out_dir
    last = latest_checkpoint(out_dir) if Path(out_dir).is_dir() else None
    if last is None:
        said = f"interrupted before its first checkpoint: nothing was saved in {out_dir}; run the command again."
    else:  # (--resume beside a --set train.resume naming a step is refused: two checkpoints)
        step = [v for v in _set_values(overrides, "train.resume") if v.lower() != "true"]
        but = f", leaving out train.resume={step[-1]} (--resume takes the newest checkpoint)" if step else ""
        said = (f"interrupted: its last checkpoint is {last} (the steps after it are lost); continue with "
                f"`dyndepth train {recipe} --resume` and the same --set options{but}.")
    typer.secho(said, fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint folder, hub id, or a preset name (random weights)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already in "
                                             "the text (transformers' rule; 1: off)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or 'byte'; default: the model folder."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 | auto; default (auto): "
                                                   "config.json's, as in transformers."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto (CUDA when visible, else cpu)."),
    seed: int = typer.Option(0),
    stream: bool = typer.Option(True, help="Print tokens as they come (single prompt)."),
    skip_budget: Optional[float] = typer.Option(None, "--skip-budget", help="GateSkip: the fraction of tokens that "
                                                "skip each branch (thresholds from `dyndepth calibrate`)."),
    knobs: str = typer.Option("", help="Method knobs k=v,... for this generation, e.g. capacity=0.5,mode=router_threshold (MoD)."),
    compile: bool = typer.Option(False, help="Compile the decode step over a static cache (one graph; CUDA graphs "
                                 "on a GPU): the first tokens wait for the compile."),
) -> None:
    """Generate text from a model with the KV-cached batched sampler."""
    import torch

    from dyndepth.generation import check_length, check_sampling
    from dyndepth.methods.calibration import parse_knobs
    from dyndepth.models.forward import check_inputs
    from dyndepth.tokenizer import encode_batch, for_vocab, load_tokenizer
    from dyndepth.train.run import check_own_tokenizer

    method_knobs = _run(parse_knobs, knobs)
    _run(check_sampling, temperature, top_k, top_p, repetition_penalty)  # before the prompt is echoed (errors ran
    # into it)
    if max_new_tokens < 0:
        _fail(ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}."))
    if temperature == 0 and (top_k is not None or top_p is not None):  # (as transformers warns at do_sample=False)
        typer.secho("warning: --top-k / --top-p only act when sampling (--temperature > 0); this decodes greedily.",
                    fg=typer.colors.YELLOW, err=True)
    lm = _run(_load_model, model, dtype, device)
    device = next(lm.parameters()).device  # where it loaded: "auto" (CUDA when visible) is no torch device name
    if skip_budget is not None or method_knobs or getattr(lm, "method", None) is not None:
        _run(_check_decoding_knobs, lm, skip_budget, method_knobs)  # (a method's thresholds too) before the echo
    preset = model in _presets()
    if tokenizer and not preset:
        _run(check_own_tokenizer, model, tokenizer)
    tok = for_vocab(_run(load_tokenizer, tokenizer or ("byte" if preset else model)), lm.config.vocab_size)
    ids, mask = encode_batch(tok, prompt, add_bos=None, padding_side="left")  # BOS as the tokenizer adds it (Llama's)
    ids = ids.masked_fill(mask == 0, 0)  # masked padding: an id every model has (the byte pad, 258, is past 256 ids)
    empty = [i + 1 for i, row in enumerate(mask) if not row.any()]
    if empty:
        _fail(ValueError(f"prompt {empty[0]} is empty (no token to continue from); give it some text."))
    _run(check_inputs, lm.config, ids, mask)  # (a prompt too long for the model; ids the model lacks)
    _run(check_length, lm.config, ids.shape[1], max_new_tokens)
    callback = None
    if stream and len(prompt) == 1:
        typer.echo(prompt[0], nl=False)
        callback = _TextStream(tok, ids[0, -1:].tolist())  # (left padding: the prompt's last token)
    out = _run(lm.generate, ids.to(device), max_new_tokens, attention_mask=mask.to(device),
               temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
               callback=callback,
               generator=torch.Generator(device=device).manual_seed(seed), skip_budget=skip_budget,
               method_knobs=method_knobs, compile=compile)
    if callback is not None:
        callback.finish()
        return
    T = ids.shape[1]
    for text, row in zip(prompt, out.tolist()):
        typer.echo(text + _continuation(tok, row[T - 1:T], row[T:]))  # (after the prompt's last token)
        typer.echo("---")


def _continuation(tok, context: list[int], new: list[int]) -> str:
    """The text `new` ids add after the `context` ids (the token before them): decoded together, so the new text is
    what decoding the whole output gives after the prompt. Decoded alone, a Llama-2 / Mistral tokenizer's decoder
    strips the leading space of its text (Strip(left=1)), which glued the first new word to the prompt ("The
    quickbrown")."""
    base, text = tok.decode(context), tok.decode(context + new)
    return text[len(base):] if text.startswith(base) else tok.decode(new)


class _TextStream:
    """generate's callback for one row: prints the text of the line's tokens so far as it grows, decoded after the
    token before them (`context`: the prompt's last, see `_continuation`). Each token decoded alone would split a
    character that spans several tokens (bytes or byte-level BPE pieces) into U+FFFD marks; the growing text holds
    back a trailing U+FFFD until the character completes (or the generation ends). A finished line starts a new
    buffer, so decoding stays linear in the output, not quadratic; so does a decoder's rewrite of printed text (what
    is printed stays as it was)."""

    def __init__(self, tok, context: list[int] = ()) -> None:
        self.tok, self.context, self.ids, self.shown = tok, list(context), [], ""

    def __call__(self, _step: int, token) -> None:
        self.ids.append(int(token[0]))
        self._show(strip=True)
        if self.shown.endswith("\n"):
            self.context, self.ids, self.shown = self.ids[-1:], [], ""

    def finish(self) -> None:
        self._show(strip=False)
        typer.echo()

    def _show(self, strip: bool) -> None:
        text = _continuation(self.tok, self.context, self.ids)
        if not text.rstrip("\ufffd").startswith(self.shown):  # the decoder rewrote printed text (a cleanup of
            # " ." to "."): that stays printed, a buffer starts here
            self.context, self.ids, self.shown = self.ids[-2:-1], self.ids[-1:], ""
            text = _continuation(self.tok, self.context, self.ids)
        text = text.rstrip("\ufffd") if strip else text
        if len(text) > len(self.shown):
            typer.echo(text[len(self.shown):], nl=False)
            self.shown = text


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Checkpoint folder with a method attached (GateSkip, MoD)."),
    text: Path = typer.Option(..., help="Calibration text: a UTF-8 file like the text the model will decode."),
    knobs: str = typer.Option(..., help="The knobs to calibrate for, e.g. budget=0.3 (GateSkip) or capacity=0.5 "
                                        "(MoD router_threshold)."),
    out: Path = typer.Option(..., help="Output folder: the checkpoint with the thresholds stored."),
    batches: int = typer.Option(8, help="Calibration batches."),
    batch_size: int = typer.Option(4, "--batch-size"),
    seq_len: int = typer.Option(256, "--seq-len"),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or 'byte'; default: the model folder."),
    device: str = typer.Option("cpu"),
) -> None:
    """Fit a method's decoding thresholds on a text at the given knobs and save the checkpoint with them, for
    `dyndepth generate --skip-budget` (token-by-token decoding cannot rank a batch)."""
    from dyndepth.methods.calibration import calibrate as fit
    from dyndepth.methods.calibration import parse_knobs, text_batches, thresholds_record
    from dyndepth.tokenizer import load_tokenizer
    from dyndepth.train.run import check_own_tokenizer

    wanted = _run(parse_knobs, knobs)
    if not text.is_file():
        _fail(FileNotFoundError(f"--text {text}: no such file."))
    _fresh_output(out, "calibrate --out", src=model)
    from dyndepth.data.sources import read_utf8

    corpus = _run(read_utf8, text, "--text")
    if tokenizer:
        _run(check_own_tokenizer, model, tokenizer)
    lm = _run(_load_model, model, None, device)
    device = next(lm.parameters()).device  # where it loaded: "auto" (CUDA when visible) is no torch device name
    tok = _run(load_tokenizer, tokenizer or model)
    ids = _run(text_batches, tok, corpus, batches, batch_size, seq_len)
    thresholds = _run(fit, lm, [b.to(device) for b in ids], **wanted)
    names = _run(thresholds_record, thresholds)  # (null: keeps every token, e.g. MoD at capacity 1.0)
    path = _run(lm.save_pretrained, out)
    tok.save(path)  # the folder is self-contained: `dyndepth generate OUT` needs no --tokenizer
    windows = sum(len(b) for b in ids)
    (path / "calibration.json").write_text(json.dumps({"knobs": wanted, "text": str(text), "windows": windows,
                                                       "seq_len": seq_len, "thresholds": names}, indent=1,
                                                      allow_nan=False))
    typer.echo(f"calibrated {len(thresholds)} thresholds at {wanted} on {windows} windows of {seq_len} tokens; "
               f"wrote {path}")


def _numbers(text: str | None, option: str, kind=float) -> list | None:
    """A comma-separated list of numbers from an option ("0,0.15,0.3"); a word in it is one error naming the option."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
        if kind is int and not all(v.is_integer() for v in values):  # 1.7 became 1; inf overflowed
            raise ValueError
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        _fail(ValueError(f"{option} takes comma-separated {what}, e.g. {option} 1,2; got {text!r}."))
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:  # (a bench printed two rows of one measurement)
        _fail(ValueError(f"{option} lists {kind(repeated)} twice; give each value once."))
    return [kind(v) for v in values]


def _fresh_output(dst: Path, what: str, src: str | None = None, option: str = "--out") -> None:
    """An output folder must be new or empty, or the source itself (an in-place rewrite): writing over another
    checkpoint left its other files (tokenizer, shards) beside the new ones."""
    if dst.exists() and not dst.is_dir():
        _fail(ValueError(f"{dst} is a file; {what} writes a folder."))
    _writable_folder(dst, option)
    same = src is not None and Path(src).exists() and dst.exists() and dst.resolve() == Path(src).resolve()
    if dst.is_dir() and any(dst.iterdir()) and not same:
        _fail(ValueError(f"{dst} already holds files; {what} writes into a new or empty folder (or in place, the "
                         "source folder itself): remove it or choose another folder."))


def _set_values(overrides: list[str], key: str) -> list[str]:
    """The values `--set key=value` options give `key`, in order."""
    return [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == key]


def _out_folder(out: Path, what: str) -> None:
    """A results folder that is a file failed only when the results were written, after all the work."""
    if out.exists() and not out.is_dir():
        _fail(ValueError(f"--out {out} is a file; {what} writes its results into a folder: give a folder."))
    _writable_folder(out, "--out")


def _writable_folder(folder: Path, option: str) -> None:
    """A folder under a file, or where this user cannot write, stopped the command with a NotADirectoryError /
    PermissionError traceback as it wrote its output, after all the work (eval's scores, a bench's timings)."""
    from dyndepth.train.run import check_out_dir

    _run(check_out_dir, folder, option, "the output")


def _check_decoding_knobs(lm, skip_budget: Optional[float], knobs: dict) -> None:
    """`generate`'s knobs (and an attached method's thresholds for its saved settings) checked by entering the
    method's decoding scope once (before the prompt is echoed)."""
    from dyndepth.generation import decoding_knobs

    with decoding_knobs(lm, skip_budget, knobs):
        pass


def _presets():
    from dyndepth import PRESETS

    return PRESETS


@app.command()
def convert(
    src: str = typer.Argument(..., help="HF checkpoint folder, hub id, or a training checkpoint (out_dir/step_N)."),
    dst: Path = typer.Argument(..., help="Output folder (config.json + safetensors + tokenizer files)."),
    dtype: Optional[str] = typer.Option(None, help="Convert weights to float32 | bfloat16 | float16."),
    max_shard_gb: float = typer.Option(5.0, help="Shard safetensors above this size."),
    plain: bool = typer.Option(False, help="Leave the method out (its tensors and config.json's dyndepth_method): "
                                           "the base model as a plain transformers folder."),
) -> None:
    """Load a checkpoint and write it back as a HF checkpoint (dtype conversion, re-sharding); a training
    checkpoint (`step_*/`) is exported to HF format first."""
    from dyndepth.interop.hf import convert_checkpoint

    if not max_shard_gb > 0:  # 0 or less wrote one shard per tensor
        _fail(ValueError(f"--max-shard-gb must be > 0 (the largest shard, in GiB; default 5), got {max_shard_gb}."))
    max_shard_bytes = int(max_shard_gb * 2**30)
    step = (Path(src) / "train_state.pt").exists()
    if step and dst.exists() and dst.resolve() == Path(src).resolve():  # its weights and manifest would disagree
        _fail(ValueError(f"{src} is a training checkpoint: convert exports it into a new folder, never in place "
                         f"(e.g. dyndepth convert {src} {Path(src).parent / 'exported'})."))
    _fresh_output(dst, "convert", src=None if step else src, option="DST")
    if step:
        from dyndepth.train.run import export_checkpoint

        exported = _run(export_checkpoint, src, dst, plain=plain)
        if dtype is None and max_shard_bytes == 5 * 2**30:  # exported as asked (save_pretrained's default shards)
            typer.echo(f"wrote {exported}")
            return
        src = str(dst)
    path = _run(convert_checkpoint, src, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, plain=plain)
    typer.echo(f"wrote {path}")


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="A recipe (.toml or .yaml); see recipes/."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set train.lr=3e-4 (repeatable)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in train.out_dir (none there: a new "
                                "run starts, with a warning)."),
    method: Optional[str] = typer.Option(None, help="Shorthand for --set method.name=NAME (e.g. gateskip)."),
) -> None:
    """Train or post-train a model from a recipe; run under torchrun for several GPUs."""
    from dyndepth.train.run import run_training

    named = _set_values(set_, "method.name")
    if method and any(n != method for n in named):
        _fail(ValueError(f"--method {method} and --set method.name={named[-1]} name two methods; give one."))
    picked = _set_values(set_, "train.resume")
    if resume and any(p.lower() != "true" for p in picked):  # (--resume, applied last, replaced the step asked for)
        _fail(ValueError(f"--resume (the newest checkpoint) and --set train.resume={picked[-1]} name two checkpoints; "
                         "give one."))
    overrides = list(set_) + (["train.resume=true"] if resume else []) + ([f"method.name={method}"] if method else [])
    try:
        result = _run(run_training, recipe, overrides)
    except KeyboardInterrupt:  # Ctrl-C ended the run with a blank line: say what is kept and how to go on
        _interrupted(recipe, overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        typer.echo(f"trained {result.steps} steps; last checkpoint: {result.last_checkpoint}")
        if result.exported is not None:  # the folder generate / eval / calibrate / from_pretrained load
            typer.echo(f"exported model: {result.exported} (dyndepth generate {result.exported} -p TEXT)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    steps: int = typer.Option(600, help="Base training steps (the defaults fit 2 CPU cores in under 10 minutes)."),
    post_steps: int = typer.Option(120, help="Post-training steps of each method (and of the plain fine-tune)."),
    eval_examples: int = typer.Option(100, help="Held-out examples per task."),
) -> None:
    """Train a tiny model on synthetic tasks (no network), post-train every method from it, print one table."""
    _out_folder(out, "demo")
    from dyndepth.demo import DemoConfig, run_demo

    _run(run_demo, _run(DemoConfig, out_dir=str(out), steps=steps, post_steps=post_steps, eval_examples=eval_examples))


@app.command()
def repro(
    base: Optional[str] = typer.Argument(None, help="Base checkpoint folder with its tokenizer.json (a base "
                                                    "recipe's model); not with --render-only."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Offline lm-eval task files (../shared/data)."),
    train_data: Optional[Path] = typer.Option(None, "--train-data", help="Post-training text (a Gutenberg shard)."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Held-out text (default: every 100th document; "
                                                                    "of a one-document text, its last 10%)."),
    profile: str = typer.Option("cpu", help="cpu (under an hour on 2 cores) | quick (a smoke run)."),
    steps: Optional[int] = typer.Option(None, help="Post-training steps per contender (default: the profile's)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated offline tasks (default: the profile's)."),
    limit: Optional[int] = typer.Option(None, help="Examples per task (default: the profile's)."),
    out: Path = typer.Option(Path("runs/repro"), help="Folder for REPORT.md, results.json and the plots."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Token shards of the post-training text "
                                                                       "(default: runs/data, the base recipe's)."),
    study: Optional[Path] = typer.Option(None, help="A `dyndepth study tokens` output folder: Dreamer against its "
                                                    "matched baselines in the report."),
    render_only: bool = typer.Option(False, "--render-only", help="Rewrite REPORT.md from --out's results.json "
                                                                   "(no training or scoring)."),
) -> None:
    """Post-train every method from one base and write REPORT.md: quality vs compute, the papers' claims, plots."""
    _out_folder(out, "repro")
    from dyndepth.repro import ReproConfig, rerender, run_repro

    if render_only:
        _run(rerender, str(out), str(study or ""))
        return
    given = (("BASE", base), ("--data-dir", data_dir), ("--train-data", train_data))
    missing = [name for name, v in given if v is None]
    if missing:
        _fail(ValueError(f"repro needs {', '.join(missing)}: the base checkpoint, the offline task files and the "
                         "post-training text (or --render-only to rewrite a finished run's report)."))

    cfg = _run(ReproConfig.from_profile, profile, base=base, data_dir=str(data_dir), train_data=str(train_data),
               val_data=str(val_data or ""), out_dir=str(out), post_steps=steps, limit=limit, study=str(study or ""),
               cache_dir=None if cache_dir is None else str(cache_dir),
               tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None)
    _run(run_repro, cfg)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Checkpoint folder, hub id, or a preset name (random weights)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks. With --data-dir: hellaswag, piqa, "
                                        "arc_easy, arc_challenge, winogrande, wsc273, boolq, lambada, copa, "
                                        "openbookqa, siqa, commonsense_qa, gsm8k, wikitext2 or all; "
                                        "else lm-eval's own."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder of the offline data (eval_gauntlet/, "
                                                                     "hellaswag/, piqa/, gsm8k/, wikitext2_tokens/)."),
    limit: Optional[int] = typer.Option(None, help="Score at most N examples per task (perplexity: the text up to "
                                        "its N-th non-empty line)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per forward (default 8)."),
    model_args: str = typer.Option("", "--model-args", help="k=v,...: tokenizer, dtype, device, max_length, "
                                                            "max_gen_toks and method knobs, e.g. skip_budget=0.3."),
    perplexity: Optional[Path] = typer.Option(None, help="A text file: sliding-window perplexity and bits per byte."),
    stride: Optional[int] = typer.Option(None, help="Perplexity window stride (default: max-length / 2)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Perplexity window (default: the model's "
                                                                        "context, at most 2048)."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for results.json and results.md."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt (default: "
                                              "each task's own; tasks zero-shot by their config, as the offline "
                                              "multiple-choice ones, stay so)."),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template", help="Render prompts with the "
                                             "tokenizer's chat template (few-shot examples as turns), as lm-eval's "
                                             "--apply_chat_template."),
) -> None:
    """Benchmarks through lm-eval (offline task files with --data-dir) and perplexity, in one table."""
    _out_folder(out, "eval")
    from dyndepth.eval.run import run_eval

    try:
        result = _run(run_eval, model, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                      model_args=model_args, perplexity=perplexity, stride=stride, max_length=max_length, out=out,
                      num_fewshot=num_fewshot, apply_chat_template=apply_chat_template)
    except OSError as e:  # lm-eval's own tasks download their data (requests' and the hub's errors are OSErrors)
        local = (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
        if data_dir is not None or not tasks or isinstance(e, local):
            raise
        _fail(OSError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- without --data-dir the "
                      "tasks are lm-eval's own, which download their data; offline, pass --data-dir "
                      "../shared/data for the local copies."))
    typer.echo(result["table"])
    typer.echo(f"wrote {result['path']}")


@bench_app.command("core")
def bench_core(
    model: str = typer.Option("bench-small", help="Preset name (random weights) or checkpoint folder / hub id."),
    batch_size: int = typer.Option(1), prompt_len: int = typer.Option(512),
    decode_batch_size: int = typer.Option(1), decode_prompt_len: int = typer.Option(64),
    new_tokens: int = typer.Option(32), dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"), compile: bool = typer.Option(False),
    repeats: int = typer.Option(5), out: Path = typer.Option(Path("runs/bench")),
    load_memory: bool = typer.Option(True, help="Measure each side's peak RSS while loading (two fresh processes)."),
) -> None:
    """Prefill and decode tokens/s against HF transformers (same weights), load memory, KV bytes/token."""
    _out_folder(out, "bench core")
    from dyndepth.bench.core import CoreBenchConfig
    from dyndepth.bench.core import main as bench_main

    cfg = _run(CoreBenchConfig, model=model, batch_size=batch_size, prompt_len=prompt_len,
                          decode_batch_size=decode_batch_size, decode_prompt_len=decode_prompt_len,
                          new_tokens=new_tokens, dtype=dtype, device=device, compile=compile,
                          repeats=repeats, load_memory=load_memory, out_dir=str(out))
    _run(bench_main, cfg)


@bench_app.command("train")
def bench_train(
    model: str = typer.Option("demo-tiny", help="Preset name."), batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(256), steps: int = typer.Option(20), dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"), compile: bool = typer.Option(False),
    out: Path = typer.Option(Path("runs/bench")),
) -> None:
    """Training tokens/s and MFU of our trainer step against a minimal plain PyTorch loop."""
    _out_folder(out, "bench train")
    from dyndepth.bench.train import TrainBenchConfig
    from dyndepth.bench.train import main as bench_main

    _run(bench_main, _run(TrainBenchConfig, model=model, batch_size=batch_size, seq_len=seq_len, steps=steps,
                          dtype=dtype, device=device, compile=compile, out_dir=str(out)))


@bench_app.command("gateskip")
def bench_gateskip(
    model: str = typer.Option("bench-small", help="Preset (random gated weights) or a GateSkip checkpoint."),
    budgets: str = typer.Option("0,0.15,0.3,0.5", help="Comma-separated skip budgets; the first is the baseline."),
    prefill_lens: str = typer.Option("512,2048"), decode_batches: str = typer.Option("1,8,32"),
    new_tokens: int = typer.Option(16),
    decode_prompt_len: int = typer.Option(64, help="Decode: the prompt's tokens before the timed steps."),
    gate: str = typer.Option("vector"), dtype: str = typer.Option("float32"),
    path: str = typer.Option("auto", help="Partially kept branches: auto (cost rule) | packed | dense."),
    device: str = typer.Option("cpu"), repeats: int = typer.Option(3), out: Path = typer.Option(Path("runs/bench")),
    compile: bool = typer.Option(False, help="Compile the decode steps (static cache, as generate(compile=True))."),
    calibration_text: str = typer.Option("", help="A UTF-8 text to calibrate decoding's thresholds on and take its "
                                         "prompts from (the checkpoint's tokenizer); default: random ids, for a "
                                         "preset's random gates."),
) -> None:
    """GateSkip prefill and decode: realized speedup next to the executed and ideal FLOP ratios, per budget."""
    _out_folder(out, "bench gateskip")
    from dyndepth.bench.gateskip import GateSkipBenchConfig
    from dyndepth.bench.gateskip import main as bench_main

    cfg = _run(GateSkipBenchConfig, model=model, budgets=_numbers(budgets, "--budgets"),
               prefill_lens=_numbers(prefill_lens, "--prefill-lens", int),
               decode_batches=_numbers(decode_batches, "--decode-batches", int), new_tokens=new_tokens,
               decode_prompt_len=decode_prompt_len, gate=gate,
               path=path, dtype=dtype, device=device, repeats=repeats, compile=compile,
               calibration_text=calibration_text, out_dir=str(out))
    _run(bench_main, cfg)


@bench_app.command("quality")
def bench_quality(
    base: str = typer.Option("runs/demo/base_model", help="Base checkpoint trained on the embedded data."),
    steps: int = typer.Option(120, help="Post-training steps per method."),
    out: Path = typer.Option(Path("runs/bench")),
) -> None:
    """GateSkip vs the Mixture-of-Depths baseline at equal compute, post-trained from one base model."""
    _out_folder(out, "bench quality")
    from dyndepth.bench.quality import QualityBenchConfig
    from dyndepth.bench.quality import main as bench_main

    _run(bench_main, _run(QualityBenchConfig, base=base, steps=steps, out_dir=str(out)))


@bench_app.command("dnd")
def bench_dnd(
    model: str = typer.Option("bench-small",
                              help="Preset (random weights, tau fitted to --ratio) or a DND checkpoint."),
    ratio: float = typer.Option(0.2, help="Preset only: the share of tokens each DND layer nests."),
    prefill_len: int = typer.Option(128), batches: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(16),
    decode_prompt_len: int = typer.Option(64, help="Decode: the prompt's tokens before the timed steps."),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"), repeats: int = typer.Option(3),
    compile: bool = typer.Option(False, help="Compile the decode steps (static cache, as generate(compile=True))."),
    throughput: bool = typer.Option(True, help="--no-throughput: quality only."),
    quality: bool = typer.Option(False, help="Also post-train DND and plain SFT from --base at equal tokens."),
    base: str = typer.Option("runs/demo/base_model", help="Quality: base checkpoint trained on the embedded data."),
    steps: int = typer.Option(120, help="Quality: post-training steps per run."),
    out: Path = typer.Option(Path("runs/bench")),
) -> None:
    """DND against the base model: prefill and decode wall-clock overhead next to the FLOP overhead; --quality."""
    _out_folder(out, "bench dnd")
    from dyndepth.bench.dnd import DNDBenchConfig, DNDQualityConfig
    from dyndepth.bench.dnd import main as bench_main

    cfg = _run(DNDBenchConfig, model=model, ratio=ratio, prefill_len=prefill_len, new_tokens=new_tokens,
               decode_prompt_len=decode_prompt_len, dtype=dtype,
               batches=_numbers(batches, "--batches", int), device=device, repeats=repeats, compile=compile,
               out_dir=str(out)) if throughput else None
    qcfg = _run(DNDQualityConfig, base=base, steps=steps, out_dir=str(out)) if quality else None
    if cfg is None and qcfg is None:
        _fail(ValueError("nothing to run: --no-throughput needs --quality."))
    _run(bench_main, cfg, qcfg)


@bench_app.command("dreamer")
def bench_dreamer(
    model: str = typer.Option("dreamer-bench", help="A Dreamer preset (random weights)."),
    batch_size: int = typer.Option(8, help="Training batch."), seq_len: int = typer.Option(256),
    steps: int = typer.Option(5, help="Timed training steps per model."),
    decode_batches: str = typer.Option("1,8,32", help="Comma-separated decode batch sizes."),
    prompt_len: int = typer.Option(32), new_tokens: int = typer.Option(16), repeats: int = typer.Option(3),
    dtype: str = typer.Option("float32"), device: str = typer.Option("cpu"),
    compile: bool = typer.Option(False, help="Compile both models: training per layer (as train.compile), decode "
                                 "steps over a static cache (as generate(compile=True))."),
    out: Path = typer.Option(Path("runs/bench")),
) -> None:
    """Dreamer against a dense decoder of equal FLOPs per token: training tokens/s and memory, decode tokens/s."""
    _out_folder(out, "bench dreamer")
    from dyndepth.bench.dreamer import DreamerBenchConfig
    from dyndepth.bench.dreamer import main as bench_main

    cfg = _run(DreamerBenchConfig, model=model, batch_size=batch_size, seq_len=seq_len, steps=steps,
               decode_batches=_numbers(decode_batches, "--decode-batches", int), prompt_len=prompt_len,
               new_tokens=new_tokens, repeats=repeats, dtype=dtype, device=device, compile=compile, out_dir=str(out))
    _run(bench_main, cfg)


@app.command()
def match(
    config: str = typer.Argument(..., help="Reference model: a preset, a recipe (.toml / .yaml) or a checkpoint."),
    against: str = typer.Option("dense,moe,huginn,moeut,mor", help="Comma-separated baseline families."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch of the memory measurement (default: the "
                                                        "reference recipe's, else 8)."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length of FLOPs per token and memory (default: the "
                                                     "reference recipe's, else 256)."),
    tolerance: float = typer.Option(0.05, help="Largest relative mismatch in parameters, FLOPs and memory."),
    device: str = typer.Option("cpu", help="Memory: cuda measures the peak, cpu the bytes a step holds."),
    out: Path = typer.Option(Path("runs/match"), help="Folder for one recipe per baseline and match.md."),
    switchhead: int = typer.Option(0, help="MoEUT candidates with SwitchHead attention: experts per head (0: off)."),
) -> None:
    """Baselines matched jointly in parameters, FLOPs per token and training memory to a reference model."""
    _out_folder(out, "match")
    from dyndepth.bench.match import MatchConfig
    from dyndepth.bench.match import main as match_main

    cfg = _run(MatchConfig, reference=config, against=[f.strip() for f in against.split(",") if f.strip()],
               batch_size=batch_size, seq_len=seq_len, tolerance=tolerance, device=device, out_dir=str(out),
               switchhead=switchhead)
    _run(match_main, cfg)


@study_app.command("tokens")
def study_tokens(
    profile: str = typer.Option("cpu", help="cpu (under an hour on one core) | gpu (dreamer-small, 85.8M "
                                "parameters, CUDA) | smoke."),
    reference: Optional[str] = typer.Option(None, help="Reference model (default: the profile's)."),
    against: Optional[str] = typer.Option(None, help="Comma-separated baseline families (default: all)."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated training-token budgets."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default: 0)."),
    device: Optional[str] = typer.Option(None),
    out: Path = typer.Option(Path("runs/study"), help="Folder for study.md, study.json and the PNG."),
    text: Optional[Path] = typer.Option(None, help="Also train on this text file (e.g. a Gutenberg shard): "
                                                   "held-out bits per byte at each budget."),
    text_val: Optional[Path] = typer.Option(None, help="The text's held-out file (default: every 100th "
                                                     "document; of a one-document text, its last 10%)."),
) -> None:
    """Reference and matched baselines trained at several token budgets: tokens-to-accuracy ratios."""
    _out_folder(out, "study tokens")
    from dyndepth.bench.study import main as study_main
    from dyndepth.bench.study import study_config

    cfg = _run(study_config, profile, reference=reference, budgets=_numbers(budgets, "--budgets", int),
               seeds=_numbers(seeds, "--seeds", int), device=device,
               against=None if against is None else [f.strip() for f in against.split(",") if f.strip()],
               out_dir=str(out), text=None if text is None else str(text),
               text_val=None if text_val is None else str(text_val))
    _run(study_main, cfg)


def main() -> None:
    from dyndepth.devices import retain_freed_cpu_memory

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        retain_freed_cpu_memory()  # freed CPU memory is reused, not faulted in again every step (devices.py)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
