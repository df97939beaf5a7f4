"""What enhance_prompt adds to a prediction, on a CPU, side by side with the prediction itself.

1. The tiny text-to-video model (as the tests use), one prediction through
   `VideoGenerator.render_mp4`: without enhance_prompt, with the endpoint backend (a
   chat-completions server on 127.0.0.1, so the figure is our own overhead, not a provider's
   latency) and with the local backend on the tiny random Qwen2 (capped at 226 tokens).
2. The local model at its real size: Qwen2.5-1.5B-Instruct's architecture from its published
   config (28 layers, 1536 wide, 12 query and 2 key-value heads, MLP 8960, vocabulary
   151936, tied embeddings) with random weights, float32: the prompt pass over a chat of the
   instruction's length, then greedy tokens, with the same GenerationConfig as
   prompts/local.py. One `generate` call is clocked at every token it hands over: the time
   to the first token is the prompt pass, the median gap between the later ones the
   per-token time, and a 226-token rewrite is projected from those two.

Usage: python3 benchmarks/enhance_prompt.py [--part tiny|full-size|both] [--tokens 16]
[--out DIR] (default DIR: benchmarks/results/cpu/enhance-prompt; one JSON per part, and
results.md from every JSON there)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import HostPeak, environment, fmt, markdown_table, write_json
from cogvideox_cog.devtools.tiny import save_tiny_weights
from cogvideox_cog.devtools.tiny_llm import save_tiny_causal_lm
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.prompts.endpoint import EndpointRewriter
from cogvideox_cog.prompts.enhance import PromptEnhancer
from cogvideox_cog.prompts.local import LocalRewriter
from cogvideox_cog.variants import VARIANTS
from tests.chat_server import ChatServer

CPU = torch.device("cpu")
PROMPT = "a cat playing piano"
# The instruction, its example and a short prompt, in Qwen2.5 tokens: about 2,100
# characters of English at about 4.3 characters a token.
CHAT_TOKENS = 500
CAP_TOKENS = 226  # the text encoder's length, the rewrite's cap
QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def tiny_predictions(folder: Path, repeats: int) -> dict:
    """Median seconds of one tiny prediction, plain and with each backend, and of the rewrite
    alone. Rounds interleave the backends, so load from other work on the host falls on all
    of them alike."""
    variant = VARIANTS["cogvideox-5b"]
    weights = save_tiny_weights(folder / "t2v", "1.0", "t2v")
    generator = VideoGenerator(variant, build_pipeline(variant, weights, CPU, "none"), CPU)
    fields = dict(prompt=PROMPT, negative_prompt="", num_frames=9, num_inference_steps=2)
    fields |= dict(guidance_scale=6.0, use_dynamic_cfg=None, fps=None, seed=1)
    llm = save_tiny_causal_lm(folder / "llm")
    with ChatServer() as chat:
        endpoint = EndpointRewriter(chat.base_url, "bench", None, timeout=30)
        local = LocalRewriter.load(llm, "tiny", CPU, video_peak_gib=None, timeout=600)
        enhancers = {
            "none": None,
            "endpoint (loopback)": PromptEnhancer(endpoint),
            "local, tiny Qwen2": PromptEnhancer(local),
        }
        generator.render_mp4(Request(**fields))  # the first prediction pays one-off costs
        kinds = ("prediction", "prediction_cpu", "rewrite", "rewrite_cpu")
        times = {name: {kind: [] for kind in kinds} for name in enhancers}
        for _ in range(repeats):
            for name, enhancer in enhancers.items():
                _time_one(generator, enhancer, fields, times[name])
    return {
        name: {kind: statistics.median(values) if values else 0.0 for kind, values in kinds.items()}
        for name, kinds in times.items()
    }


def _time_one(generator, enhancer, fields: dict, times: dict[str, list[float]]) -> None:
    """One prediction with `enhancer` (None: without enhance_prompt), then its rewrite alone:
    wall seconds, and CPU seconds of this process (steadier on a shared host)."""
    generator.enhancer = enhancer
    request = Request(**fields, enhance_prompt=enhancer is not None)
    wall, cpu = _clocks(lambda: generator.render_mp4(request))
    times["prediction"].append(wall)
    times["prediction_cpu"].append(cpu)
    if enhancer is not None:
        wall, cpu = _clocks(
            lambda: enhancer.enhance(PROMPT, task="t2v", seed=1, max_tokens=CAP_TOKENS)
        )
        times["rewrite"].append(wall)
        times["rewrite_cpu"].append(cpu)


def _clocks(run) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all its threads) that `run` takes."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def full_size_local_model(tokens: int, shape: dict = QWEN25_15B) -> dict:
    """Prompt pass and per-token time of a model of `shape` (Qwen2.5-1.5B's unless told),
    projected to the cap, and the process's peak RSS from building it to the last token: the
    prompt pass's activations come and go, so the RSS left at the end can be below the peak."""
    start = [round(x, 2) for x in os.getloadavg()]
    with HostPeak() as host:
        result = _time_local_model(tokens, Qwen2Config(**shape))
    result["load_average_start"] = start
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["peak_rss_gib"] = host.peak / 2**30
    result["peak_rss_method"] = host.method
    return result


class TokenClock(BaseStreamer):
    """Wall and CPU clocks each time `generate` hands over tokens: once with the prompt, before
    the prompt pass, then once per new token, right after it is chosen."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def put(self, value) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def end(self) -> None:
        pass


def _time_local_model(tokens: int, config: Qwen2Config) -> dict:
    """Every figure from one `generate` call: the prompt pass is the time to the first token,
    the per-token time the median of the gaps between the later ones. Two separate runs, one
    subtracted from the other, left each run's share of other work on the host (and any
    one-off cost) in the difference: per-token wall times came out below CPU time / cores."""
    if tokens < 2:
        raise ValueError("time at least 2 tokens: the per-token time is a gap between two")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, CHAT_TOKENS))
    eos = config.vocab_size + 1  # never produced: every run makes exactly its tokens

    def generate(new: int, clock: TokenClock | None = None) -> tuple[float, float]:
        greedy = GenerationConfig(
            do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=eos
        )
        run = partial(
            model.generate, ids, attention_mask=torch.ones_like(ids), generation_config=greedy
        )
        with torch.inference_mode():
            return _clocks(lambda: run(streamer=clock))

    generate(2)  # warm-up at the chat's length: the model has run once, as on a server
    clock = TokenClock()
    start = time.perf_counter(), time.process_time()
    whole = generate(tokens, clock)
    firsts = clock.marks[1]  # marks[0]: the prompt, handed over before the prompt pass
    gaps = [[b[i] - a[i] for a, b in itertools.pairwise(clock.marks[1:])] for i in (0, 1)]
    result = {"params": params, "chat_tokens": CHAT_TOKENS, "measured_tokens": tokens}
    result["method"] = "one generate call: first token, then the median gap between tokens"
    for i, suffix in ((0, "s"), (1, "cpu_s")):
        per_token = statistics.median(gaps[i])
        result[f"prompt_pass_{suffix}"] = firsts[i] - start[i]
        result[f"per_token_{suffix}"] = per_token
        result[f"generate_{suffix}"] = whole[i]
        result[f"token_gaps_{suffix}"] = gaps[i]
        result[f"projected_rewrite_{suffix}"] = firsts[i] - start[i] + per_token * (CAP_TOKENS - 1)
    return result


def markdown(tiny: dict | None, full: dict | None) -> str:
    lines = ["# enhance_prompt on a CPU", ""]
    if tiny:
        base = tiny["none"]["prediction"]
        base_cpu = tiny["none"]["prediction_cpu"]
        rows = [
            [
                name,
                f"{fmt(t['prediction'])} / {fmt(t['prediction_cpu'])}",
                f"{fmt(t['prediction'] - base)} / {fmt(t['prediction_cpu'] - base_cpu)}",
                f"{fmt(t['rewrite'], 3)} / {fmt(t['rewrite_cpu'], 3)}",
            ]
            for name, t in tiny.items()
        ]
        lines += [
            "Tiny text-to-video model, 9 frames, 2 steps: one prediction, and the rewrite alone, "
            "in wall / CPU seconds (medians, rounds interleaved). CPU seconds are this process's "
            "(all threads) and hold steadier than wall time when other work shares the host.",
            "",
            markdown_table(["backend", "prediction", "difference", "rewrite alone"], rows),
            "",
        ]
    if full:
        cells = [
            f"{fmt(full['prompt_pass_s'])} / {fmt(full['prompt_pass_cpu_s'])}",
            f"{fmt(full['per_token_s'], 3)} / {fmt(full['per_token_cpu_s'], 3)}",
            f"{fmt(full['generate_s'], 1)} / {fmt(full['generate_cpu_s'], 1)}",
            f"{fmt(full['projected_rewrite_s'], 1)} / {fmt(full['projected_rewrite_cpu_s'], 1)}",
            f"{fmt(full['peak_rss_gib'], 1)} GiB",
        ]
        n = full["measured_tokens"]
        header = ["prompt pass", "per token", f"the {n}-token run"]
        header += [f"{CAP_TOKENS}-token rewrite (projected)", "peak RSS"]
        load = ", ".join(
            f"{' / '.join(f'{x:.2f}' for x in full[f'load_average_{when}'])} at the {when}"
            for when in ("start", "end")
        )
        lines += [
            f"Qwen2.5-1.5B-Instruct architecture, random weights, float32, "
            f"{full['params'] / 1e9:.2f} B parameters, a {full['chat_tokens']}-token chat, "
            f"{n} greedy tokens in one `generate` call after a warm-up one, wall / CPU seconds. "
            f"The prompt pass is the time to the first token, the per-token time the median of "
            f"the {n - 1} gaps between the later ones; the projection is the prompt pass plus "
            f"{CAP_TOKENS - 1} gaps. Host load (1 / 5 / 15 minute averages): {load}.",
            "",
            markdown_table(header, [cells]),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["tiny", "full-size", "both"], default="both")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens to time at size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/enhance-prompt"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("tiny", "both"):
        env = environment(CPU)  # before the run: its load average is the one the run met
        with tempfile.TemporaryDirectory() as folder:
            tiny = tiny_predictions(Path(folder), args.repeats)
        write_json(args.out / "tiny.json", {"environment": env, "results": tiny})
    if args.part in ("full-size", "both"):
        env = environment(CPU)
        full = full_size_local_model(args.tokens)
        write_json(args.out / "full-size.json", {"environment": env, "results": full})
    # The table is rewritten from every result in the folder, whichever part ran now.
    found = {p.stem: json.loads(p.read_text())["results"] for p in args.out.glob("*.json")}
    text = markdown(found.get("tiny"), found.get("full-size"))
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
